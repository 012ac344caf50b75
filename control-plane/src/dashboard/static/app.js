// Progressive enhancement only: every flow works without this script.
// Copy buttons: shown only when this script runs; they copy the value of the input they name.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const input = document.getElementById(button.dataset.copy);
    if (!input) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      input.select();
      let ok = false;
      try {
        await navigator.clipboard.writeText(input.value);
        ok = true;
      } catch (_) {
        ok = document.execCommand && document.execCommand("copy");
      }
      button.textContent = ok ? "Copied" : "Press Ctrl+C";
      setTimeout(() => { button.textContent = "Copy"; }, 2500);
    });
  }
});
