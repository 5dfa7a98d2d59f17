// Every page's form helpers, without a round trip to the server:
// - a textarea with data-limit shows how many characters it holds against its limit;
// - the ablation form's value is required when the mode (clamp, steer) uses it.
function countCharacters(box) {
  const counter = document.getElementById(box.dataset.counter);
  if (!counter) return;
  const limit = Number(box.dataset.limit);
  counter.textContent = `${box.value.length.toLocaleString()} / ${limit.toLocaleString()} characters`;
  counter.classList.toggle("over", box.value.length > limit);
}

function requireValueForMode(select) {
  const value = select.form && select.form.querySelector("input[name=value]");
  if (!value) return;
  value.required = select.value !== "zero";
  value.placeholder = select.value === "zero" ? "not used by zero" : `required for ${select.value}`;
}

document.addEventListener("input", (e) => {
  if (e.target.matches("textarea[data-limit]")) countCharacters(e.target);
});
document.addEventListener("change", (e) => {
  if (e.target.matches("select[name=mode]")) requireValueForMode(e.target);
});
document.querySelectorAll("textarea[data-limit]").forEach(countCharacters);
document.querySelectorAll("select[name=mode]").forEach(requireValueForMode);
