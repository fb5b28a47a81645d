//! The course's quizzes: one TOML file per lesson in `lessons/quizzes/`, in the format of
//! mdbook-quiz (`[[questions]]` with `type = "MultipleChoice"`, `prompt.prompt`,
//! `prompt.distractors`, `answer.answer`, `context`). The book renders them with
//! [`render_html`]; the tests of `kvq-exercises` check their answers with kvq.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
pub struct Quiz {
    pub questions: Vec<Question>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Question {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub prompt: Prompt,
    pub answer: Answer,
    pub context: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Prompt {
    pub prompt: String,
    pub distractors: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Answer {
    pub answer: String,
}

/// Reads one quiz file; the error names the file and what is wrong in it.
pub fn load(path: &Path) -> Result<Quiz, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read quiz {}: {e}", path.display()))?;
    let quiz: Quiz = toml::from_str(&text).map_err(|e| format!("quiz {} is not valid: {e}", path.display()))?;
    for q in &quiz.questions {
        if q.kind != "MultipleChoice" {
            return Err(format!("quiz {}: question {} has type {:?}; only MultipleChoice is supported", path.display(), q.id, q.kind));
        }
        if q.prompt.distractors.is_empty() {
            return Err(format!("quiz {}: question {} has no distractors", path.display(), q.id));
        }
    }
    if quiz.questions.is_empty() {
        return Err(format!("quiz {} has no questions", path.display()));
    }
    Ok(quiz)
}

/// Every `*.toml` quiz of a directory, by file name.
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Quiz>, String> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in entries {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.insert(p.file_name().unwrap_or_default().to_string_lossy().to_string(), load(&p)?);
        }
    }
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The little markdown the quizzes use: `code` and **bold**, HTML-escaped.
pub fn inline_markdown(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", escape(part));
        } else {
            for (j, p) in escape(part).split("**").enumerate() {
                out.push_str(&if j % 2 == 1 { format!("<strong>{p}</strong>") } else { p.to_string() });
            }
        }
    }
    out
}

/// Where the answer goes among the options: fixed per question (a hash of its id), so the
/// page is the same on every build but the answer is not always first or last.
fn answer_position(id: &str, options: usize) -> usize {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (h % options as u64) as usize
}

/// One quiz as self-contained HTML: radio buttons, a check button (`theme/quiz.js`) and
/// the explanation in a `<details>` that works without JavaScript.
pub fn render_html(name: &str, quiz: &Quiz) -> String {
    let mut h = String::new();
    let _ = writeln!(h, "<div class=\"kvq-quiz\" data-quiz=\"{}\">", escape(name));
    let _ = writeln!(h, "<p class=\"kvq-quiz-title\"><strong>Quiz</strong> — {} questions (from <code>lessons/quizzes/{}</code>)</p>", quiz.questions.len(), escape(name));
    for (n, q) in quiz.questions.iter().enumerate() {
        let mut options: Vec<(&str, bool)> = q.prompt.distractors.iter().map(|d| (d.as_str(), false)).collect();
        options.insert(answer_position(&q.id, options.len() + 1), (q.answer.answer.as_str(), true));
        let _ = writeln!(h, "<div class=\"kvq-question\" id=\"quiz-{}\">", escape(&q.id));
        let _ = writeln!(h, "<p class=\"kvq-prompt\"><strong>{}.</strong> {}</p>", n + 1, inline_markdown(&q.prompt.prompt));
        let _ = writeln!(h, "<ul class=\"kvq-options\">");
        for (i, (text, correct)) in options.iter().enumerate() {
            let _ = writeln!(
                h,
                "<li><label><input type=\"radio\" name=\"quiz-{id}\" value=\"{i}\"{c}> {}</label></li>",
                inline_markdown(text),
                id = escape(&q.id),
                c = if *correct { " data-correct=\"true\"" } else { "" }
            );
        }
        let _ = writeln!(h, "</ul>");
        let _ = writeln!(h, "<button type=\"button\" class=\"kvq-check\">Check</button> <span class=\"kvq-feedback\" aria-live=\"polite\"></span>");
        let _ = writeln!(
            h,
            "<details class=\"kvq-explanation\"><summary>Answer and explanation</summary><p><strong>{}</strong></p><p>{}</p></details>",
            inline_markdown(&q.answer.answer),
            inline_markdown(&q.context)
        );
        let _ = writeln!(h, "</div>");
    }
    h.push_str("</div>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiz() -> Quiz {
        toml::from_str(
            r#"
[[questions]]
id = "a"
type = "MultipleChoice"
prompt.prompt = "Cost of `n` steps <with> cache?"
prompt.distractors = ["O(n)", "O(n^3)"]
answer.answer = "O(n^2)"
context = "Sum of **i**."
"#,
        )
        .unwrap()
    }

    #[test]
    fn renders_every_option_once_and_marks_only_the_answer() {
        let h = render_html("01.toml", &quiz());
        assert_eq!(h.matches("type=\"radio\"").count(), 3);
        assert_eq!(h.matches("data-correct").count(), 1);
        let correct_line = h.lines().find(|l| l.contains("data-correct")).unwrap();
        assert!(correct_line.contains("O(n^2)"));
        assert!(h.contains("<code>n</code>") && h.contains("&lt;with&gt;") && h.contains("<strong>i</strong>"));
    }

    #[test]
    fn answer_position_is_stable_and_spread() {
        assert_eq!(answer_position("x", 4), answer_position("x", 4));
        let spots: std::collections::HashSet<_> = (0..40).map(|i| answer_position(&format!("q{i}"), 4)).collect();
        assert_eq!(spots.len(), 4);
    }

    #[test]
    fn bad_quizzes_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("kvq-quiz-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "[[questions]]\nid = 1\n").unwrap();
        assert!(load(&p).unwrap_err().contains("is not valid"));
        std::fs::write(&p, "questions = []\n").unwrap();
        assert!(load(&p).unwrap_err().contains("no questions"));
        assert!(load(&dir.join("missing.toml")).unwrap_err().contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
