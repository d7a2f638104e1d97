//! Asking dockerd what its plugin protocol leaves out. Network and container names are not
//! passed to drivers, so they are read from dockerd's API once the network or endpoint
//! exists there (`GET /networks/ID`), as other remote drivers do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// What dockerd says of one network.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkView {
    pub name: String,
    #[serde(default)]
    pub containers: Option<std::collections::BTreeMap<String, ContainerView>>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerView {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "EndpointID")]
    pub endpoint_id: String,
}

impl NetworkView {
    /// The container name of the endpoint `endpoint_id`, once dockerd lists it.
    pub fn container_of(&self, endpoint_id: &str) -> Option<&str> {
        self.containers
            .as_ref()?
            .values()
            .find(|c| c.endpoint_id == endpoint_id)
            .map(|c| c.name.as_str())
    }
}

/// dockerd's API socket.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
}

/// The biggest answer read from dockerd.
const MAX_REPLY: usize = 4 << 20;

impl Engine {
    /// From `unix:///path` (as `DOCKER_HOST` spells it) or a plain path.
    pub fn new(host: &str) -> anyhow::Result<Self> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if !path.starts_with('/') {
            bail!("dockerd's socket must be unix:///PATH, not {host:?}");
        }
        Ok(Self {
            socket: PathBuf::from(path),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /networks/ID`; `None` while dockerd does not know it (yet).
    pub async fn network(&self, id: &str) -> anyhow::Result<Option<NetworkView>> {
        if !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("invalid network id {id:?}");
        }
        let (status, body) = self.get(&format!("/networks/{id}")).await?;
        match status {
            200 => Ok(Some(
                serde_json::from_slice(&body).context("dockerd's network is not JSON")?,
            )),
            404 => Ok(None),
            s => bail!("dockerd answered {s}"),
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let work = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .with_context(|| {
                    format!("cannot connect to dockerd at {}", self.socket.display())
                })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let task = tokio::spawn(conn);
            let req = hyper::Request::get(path)
                .header(hyper::header::HOST, "docker")
                .body(Empty::<Bytes>::new())?;
            let res = sender.send_request(req).await?;
            let status = res.status().as_u16();
            let body = Limited::new(res.into_body(), MAX_REPLY)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("cannot read dockerd's answer: {e}"))?
                .to_bytes();
            task.abort();
            Ok::<_, anyhow::Error>((status, body))
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .context("dockerd did not answer within 5 s")?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_views() {
        assert_eq!(
            Engine::new("unix:///run/docker.sock").unwrap().socket(),
            Path::new("/run/docker.sock")
        );
        assert!(Engine::new("tcp://1.2.3.4:2375").is_err());
        let v: NetworkView = serde_json::from_str(
            r#"{"Name":"you_network","Containers":{"abc":{"Name":"tomcat81","EndpointID":"e1"}}}"#,
        )
        .unwrap();
        assert_eq!(v.container_of("e1"), Some("tomcat81"));
        assert_eq!(v.container_of("e2"), None);
    }
}
