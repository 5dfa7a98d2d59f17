// "/" jumps to the token search, as in most code and docs browsers
document.addEventListener("keydown", (e) => {
  if (e.key === "/" && !/^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)) {
    e.preventDefault(); document.getElementById("token-search").focus();
  }
});

// "the ticked ones": the explain form takes the features ticked in the table (they belong to the ablate form)
const explainForm = document.getElementById("explain-form");
if (explainForm) {
  explainForm.addEventListener("submit", () => {
    const ticked = [...document.querySelectorAll('input[name="features"][form="ablate-form"]:checked')].map((b) => b.value);
    const typed = explainForm.querySelector('input[name="features"]');
    if (ticked.length && typed && !typed.value.trim()) typed.value = ticked.join(", ");
  });
}
