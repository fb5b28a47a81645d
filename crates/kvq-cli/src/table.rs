//! Plain-text and Markdown tables.

pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        w
    }

    /// A Markdown table (reads well in a terminal too). Numbers are right-aligned.
    pub fn markdown(&self) -> String {
        let w = self.widths();
        let numeric: Vec<bool> = (0..self.header.len())
            .map(|i| !self.rows.is_empty() && self.rows.iter().all(|r| r[i].chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '×')))
            .collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = w[i] - c.chars().count();
                    if numeric[i] {
                        format!("{}{c}", " ".repeat(pad))
                    } else {
                        format!("{c}{}", " ".repeat(pad))
                    }
                })
                .collect();
            format!("| {} |", parts.join(" | "))
        };
        let mut out = line(&self.header) + "\n";
        let seps: Vec<String> = w.iter().enumerate().map(|(i, &n)| if numeric[i] { format!("{}:", "-".repeat(n + 1)) } else { "-".repeat(n + 2) }).collect();
        out += &format!("|{}|\n", seps.join("|"));
        for r in &self.rows {
            out += &line(r);
            out += "\n";
        }
        out
    }
}
