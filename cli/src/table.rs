//! Tables as `docker` prints them.

/// Prints rows as left-aligned columns separated by at least three spaces, like `docker`.
pub(crate) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{line}");
    }
}

/// The first 12 characters of an id (all of a shorter one), as Docker shows ids.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
