// The book's quizzes (rendered by `mdbook-kvq` from lessons/quizzes/*.toml): "Check"
// tells whether the chosen option is right; the explanation is in a <details> below.
document.addEventListener("click", (event) => {
  const button = event.target.closest(".kvq-check");
  if (!button) return;
  const question = button.closest(".kvq-question");
  const feedback = question.querySelector(".kvq-feedback");
  const chosen = question.querySelector("input[type=radio]:checked");
  question.classList.remove("kvq-right", "kvq-wrong");
  if (!chosen) {
    feedback.textContent = "Pick an answer first.";
    return;
  }
  const right = chosen.dataset.correct === "true";
  question.classList.add(right ? "kvq-right" : "kvq-wrong");
  feedback.textContent = right ? "Right." : "Not quite: read the explanation below, then try again.";
});
