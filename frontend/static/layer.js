// "/" jumps to the token search, as in most code and docs browsers
document.addEventListener("keydown", (e) => {
  if (e.key === "/" && !/^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)) {
    e.preventDefault(); document.getElementById("token-search").focus();
  }
});
