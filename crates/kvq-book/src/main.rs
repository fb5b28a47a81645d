//! `mdbook-kvq`: the book's preprocessor (`{{#quiz path}}` → an interactive quiz) and
//! `mdbook-kvq check-links DIR`, which fails on broken links in a built book.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // mdbook asks first whether a renderer is supported: the quizzes are HTML.
        Some("supports") => {
            if args.get(1).map(String::as_str) == Some("html") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("check-links") => {
            let Some(dir) = args.get(1) else {
                eprintln!("usage: mdbook-kvq check-links BUILT_BOOK_DIR");
                return ExitCode::from(2);
            };
            match kvq_book::links::check(std::path::Path::new(dir)) {
                Ok(r) => {
                    println!("{} HTML files, {} links, {} external (not fetched)", r.files, r.links, r.external.len());
                    for e in &r.external {
                        println!("  external: {e}");
                    }
                    for p in &r.problems {
                        eprintln!("  {p}");
                    }
                    if r.problems.is_empty() {
                        println!("no broken links");
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("{} problems", r.problems.len());
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let mut input = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("mdbook-kvq: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            match kvq_book::preprocess(&input) {
                Ok(book) => {
                    println!("{book}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mdbook-kvq: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(other) => {
            eprintln!("mdbook-kvq: unknown command {other:?} (expected: supports RENDERER, check-links DIR, or the book on stdin)");
            ExitCode::from(2)
        }
    }
}
