//! Tooling for the kvq book: the quiz preprocessor and a link checker.

pub mod links;
pub mod quiz;

use std::path::Path;

/// Replaces each line `{{#quiz lessons/quizzes/NN-x.toml}}` (a path from the repository
/// root) of a chapter with the rendered quiz.
pub fn expand_quizzes(content: &str, repo_root: &Path) -> Result<String, String> {
    let mut out = String::with_capacity(content.len());
    for line in content.split_inclusive('\n') {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("{{#quiz ") {
            let rel = rest.strip_suffix("}}").ok_or_else(|| format!("unclosed quiz directive: {t}"))?.trim();
            let quiz = quiz::load(&repo_root.join(rel))?;
            let name = Path::new(rel).file_name().unwrap_or_default().to_string_lossy();
            out.push('\n');
            out.push_str(&quiz::render_html(&name, &quiz));
            out.push('\n');
        } else {
            out.push_str(line);
        }
    }
    Ok(out)
}

/// Runs [`expand_quizzes`] over every chapter of mdbook's preprocessor input
/// (`[context, book]`) and returns the book. Works on the JSON directly, so it does not
/// depend on mdbook's crate version: every object with a `content` string under a
/// `Chapter` is a chapter.
pub fn preprocess(input: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(input).map_err(|e| format!("preprocessor input is not JSON: {e}"))?;
    let [ctx, mut book]: [serde_json::Value; 2] = serde_json::from_value(v).map_err(|_| "preprocessor input is not [context, book]".to_string())?;
    let book_root = ctx.get("root").and_then(|r| r.as_str()).ok_or("the context has no root")?;
    // The book lives in <repo>/book: quiz paths are from the repository root.
    let repo_root = Path::new(book_root).join("..");
    fn walk(v: &mut serde_json::Value, repo: &Path) -> Result<(), String> {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(ch) = m.get_mut("Chapter") {
                    if let Some(serde_json::Value::String(c)) = ch.get_mut("content") {
                        *c = expand_quizzes(c, repo)?;
                    }
                }
                for (_, x) in m.iter_mut() {
                    walk(x, repo)?;
                }
            }
            serde_json::Value::Array(a) => {
                for x in a {
                    walk(x, repo)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    walk(&mut book, &repo_root)?;
    serde_json::to_string(&book).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_a_real_quiz_inside_an_mdbook_json_book() {
        let book_root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../book");
        let input = serde_json::json!([
            { "root": book_root, "renderer": "html" },
            { "items": [ { "Chapter": { "name": "c", "content": "# C\n\n{{#quiz lessons/quizzes/01-kv-cache.toml}}\nafter\n", "sub_items": [] } } ] }
        ]);
        let out: serde_json::Value = serde_json::from_str(&preprocess(&input.to_string()).unwrap()).unwrap();
        let content = out["items"][0]["Chapter"]["content"].as_str().unwrap();
        assert!(content.contains("class=\"kvq-quiz\"") && content.contains("quiz-seed-with-cache") && content.ends_with("after\n"));
        assert!(!content.contains("{{#quiz"));
    }

    #[test]
    fn a_missing_quiz_fails_the_build() {
        let err = expand_quizzes("{{#quiz lessons/quizzes/nope.toml}}\n", Path::new(".")).unwrap_err();
        assert!(err.contains("nope.toml"));
    }
}
