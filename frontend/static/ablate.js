// ticking a feature in the table means "ablate these": switch the rule to the ticked ones
document.addEventListener("change", (e) => {
  if (e.target.matches('input[type=checkbox][name=features][form=ablate-form]') && e.target.checked) {
    const rule = document.querySelector("#ablate-form select[name=selection]");
    if (rule) rule.value = "";
  }
});
