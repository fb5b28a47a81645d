//! Checks a built book: every relative `href`/`src` points to a file that exists, every
//! `#fragment` to an element id in that file, and no `{{#...}}` directive was left
//! unexpanded. External links are listed, not fetched (the book must work offline).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub links: usize,
    pub external: BTreeSet<String>,
    pub problems: Vec<String>,
}

fn attributes<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for quote in ['"', '\''] {
        let pat = format!(" {name}={quote}");
        let mut rest = html;
        while let Some(i) = rest.find(&pat) {
            rest = &rest[i + pat.len()..];
            if let Some(end) = rest.find(quote) {
                out.push(&rest[..end]);
                rest = &rest[end..];
            }
        }
    }
    out
}

fn ids(html: &str) -> BTreeSet<String> {
    attributes(html, "id").into_iter().chain(attributes(html, "name")).map(str::to_string).collect()
}

fn html_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            html_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "html") {
            out.push(p);
        }
    }
    Ok(())
}

/// Percent-decoding of the few escapes mdbook writes in links.
fn decode(s: &str) -> String {
    s.replace("%20", " ")
}

pub fn check(root: &Path) -> Result<Report, String> {
    let mut files = Vec::new();
    html_files(root, &mut files).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    if files.is_empty() {
        return Err(format!("no HTML files under {}", root.display()));
    }
    let mut report = Report { files: files.len(), ..Default::default() };
    let mut id_cache: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    for file in &files {
        let html = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let rel = file.strip_prefix(root).unwrap_or(file).display().to_string();
        // mdbook's print page and 404 page repeat every chapter or use site-absolute links.
        if rel == "print.html" || rel == "404.html" {
            continue;
        }
        if let Some(i) = html.find("{{#") {
            let snippet: String = html[i..].chars().take(60).collect();
            report.problems.push(format!("{rel}: unexpanded directive {snippet:?}"));
        }
        for link in attributes(&html, "href").into_iter().chain(attributes(&html, "src")) {
            report.links += 1;
            let link = link.trim();
            if link.is_empty() || link.starts_with("javascript:") || link.starts_with("data:") || link.starts_with("mailto:") {
                continue;
            }
            if link.contains("://") || link.starts_with("//") {
                report.external.insert(link.to_string());
                continue;
            }
            let (path, fragment) = match link.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (link, None),
            };
            let path = path.split('?').next().unwrap_or("");
            let target = if path.is_empty() {
                file.clone()
            } else if let Some(abs) = path.strip_prefix('/') {
                root.join(decode(abs))
            } else {
                file.parent().unwrap_or(root).join(decode(path))
            };
            let target = if target.is_dir() { target.join("index.html") } else { target };
            if !target.exists() {
                report.problems.push(format!("{rel}: broken link {link:?} ({} does not exist)", target.display()));
                continue;
            }
            if let Some(f) = fragment.filter(|f| !f.is_empty()) {
                if target.extension().is_some_and(|x| x == "html") {
                    let known = id_cache.entry(target.clone()).or_insert_with(|| ids(&std::fs::read_to_string(&target).unwrap_or_default()));
                    if !known.contains(&decode(f)) {
                        report.problems.push(format!("{rel}: link {link:?} names #{f}, which is not an id in {}", target.display()));
                    }
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_broken_files_fragments_and_directives() {
        let dir = std::env::temp_dir().join(format!("kvq-links-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.html"), r#"<h1 id="top">A</h1><a href="sub/b.html#x">b</a><a href="https://example.org/">e</a><img src="missing.png">"#).unwrap();
        std::fs::write(dir.join("sub/b.html"), r##"<p id="y">{{#quiz q.toml}}</p><a href="../a.html#top">a</a><a href="#y">y</a>"##).unwrap();
        let r = check(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.files, 2);
        assert_eq!(r.external.len(), 1);
        assert_eq!(r.problems.len(), 3, "{:#?}", r.problems);
        assert!(r.problems.iter().any(|p| p.contains("missing.png")));
        assert!(r.problems.iter().any(|p| p.contains("#x")));
        assert!(r.problems.iter().any(|p| p.contains("unexpanded")));
    }
}
