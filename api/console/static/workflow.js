/* The flowpool console's workflow page script (loaded by its template after console.js, whose FlowpoolConsole it uses).
 * No build step; the CSP allows only this origin's files: no eval, no inline handlers. */
/* ---- page: workflow (/console/workflows/<ref>) -------------------------------------------------------------------
 * Activating a version (hx-confirm asks first) swaps the versions section whole, so the button pressed is gone:
 * focus goes to the message the answer put, out of band, into the page's persistent status region
 * (#versions-status), marked [data-focus-after-swap], instead of dropping to <body>.
 */
(function () {
  "use strict";

  function focusMessage() {
    var message = document.querySelector("[data-focus-after-swap]");
    if (!message) { return; }
    message.removeAttribute("data-focus-after-swap");
    message.focus();
  }

  // After the settle: by then both the section and the out-of-band message are in the page.
  document.addEventListener("htmx:afterSettle", focusMessage);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", focusMessage);
  } else {
    focusMessage();
  }
})();
/* ---- end of page: workflow ------------------------------------------------------------------------------------- */
