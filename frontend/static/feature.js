// j / k: next / previous feature in the table order this page was opened from
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)) return;
  const link = document.getElementById({j: "next-feature", k: "prev-feature"}[e.key]);
  if (link) { e.preventDefault(); window.location.href = link.href; }
});
