// Nudge dashboard: refreshes the live parts of a page (elements with
// data-src) every few seconds. Pages work without it.
"use strict";
(function () {
  const EVERY_MS = 3000;
  function refresh(el) {
    // Never swap what someone is typing into or about to press.
    if (el.contains(document.activeElement) && document.activeElement !== document.body) {
      return;
    }
    fetch(el.dataset.src, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/ui/login") !== -1) {
          window.location.href = r.url;
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          el.innerHTML = html;
          el.dataset.refreshed = String(Date.now());
        }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-src]").forEach(function (el) {
      setInterval(function () { refresh(el); }, EVERY_MS);
    });
  });
})();
