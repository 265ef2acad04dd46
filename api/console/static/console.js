/* The flowpool console's core script, loaded by every page: no build step, no dependencies beyond htmx.
 *
 * Core (below): local times, live streams (FlowpoolConsole.follow), the "/" hotkey and the CSRF token for fetch().
 * Each page's own part is a file of its own (workflow.js, playground.js, run.js), loaded by its template.
 * The CSP allows only scripts from this origin's files: nothing here may use eval or inline handlers.
 */
(function () {
  "use strict";

  /* ---- core: times in the viewer's zone ------------------------------------------------------------------- */

  var zone = (function () {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return ""; }
  })();
  var fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  var timeFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
  var compactFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" });
  var hourFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

  /* Rewrite every <time datetime data-local> under `root` (the server wrote UTC text) in the viewer's zone.
   * data-local="time": the time of day only. "compact" and "compact-time" (table cells): the same without the zone's
   * name, which the column's header says once ([data-local-zone]); their title has the full time and the zone. */
  function localiseTimes(root) {
    var nodes = (root || document).querySelectorAll("time[data-local]");
    for (var i = 0; i < nodes.length; i++) {
      var node = nodes[i];
      var when = new Date(node.getAttribute("datetime"));
      if (isNaN(when.getTime())) { continue; }
      var kind = node.getAttribute("data-local");
      var full = fullFormat.format(when) + (zone ? " " + zone : "");
      if (kind === "compact" || kind === "compact-time") {
        node.textContent = (kind === "compact" ? compactFormat : timeFormat).format(when);
        node.title = full;
        continue;
      }
      node.textContent = kind === "time" ? timeFormat.format(when) + (zone ? " " + zone : "") : full;
      if (!node.title) { node.title = when.toISOString(); }
    }
    var zones = (root || document).querySelectorAll("[data-local-zone]");
    for (var j = 0; j < zones.length; j++) { zones[j].textContent = zone ? "(" + zone + ")" : ""; }
    localiseHours(root || document);
  }

  /* Rewrite every chart label marked data-local="hour" (an SVG <text> or <title> whose data-ts holds the unix time
   * it labels; the server wrote it in UTC) as the viewer's HH:MM, then its data-after text; the chart's axis name
   * ([data-local-label] in the same figure) then says so instead of "(UTC)". Idempotent: it reads data-ts. */
  function localiseHours(root) {
    var nodes = root.querySelectorAll('[data-local="hour"][data-ts]');
    for (var i = 0; i < nodes.length; i++) {
      var ts = parseFloat(nodes[i].getAttribute("data-ts"));
      if (!isFinite(ts)) { continue; }
      nodes[i].textContent = hourFormat.format(new Date(ts * 1000)) + (nodes[i].getAttribute("data-after") || "");
    }
    var labels = root.querySelectorAll("[data-local-label]");
    for (var j = 0; j < labels.length; j++) {
      var figure = labels[j].closest("figure") || document;
      if (figure.querySelector('[data-local="hour"][data-ts]')) {
        labels[j].textContent = labels[j].getAttribute("data-local-label");
      }
    }
  }

  /* ---- core: the CSRF token of this session ---------------------------------------------------------------- */

  /* The session's CSRF token (from <meta name="csrf-token">): send it as X-CSRF-Token on every fetch() POST. */
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  /* ---- core: following a live stream ------------------------------------------------------------------------ */

  /* Follow the server-sent events at `url` (same origin; the session cookie goes with it).
   *
   * handlers: {message(data, event), <event name>(data, event), ended() -> bool, done(), error(event)}.
   *   `data` is the event's data parsed as JSON when it is JSON, else the text.
   *   The stream is closed on a `data: [DONE]` message (then done() is called), and on an error once ended()
   *   says the run has ended: EventSource would otherwise reconnect for ever.
   * Returns {close()} to stop following.
   */
  function follow(url, handlers) {
    handlers = handlers || {};
    var source = new EventSource(url);
    var closed = false;

    function parse(text) {
      try { return JSON.parse(text); } catch (e) { return text; }
    }
    function close() {
      if (!closed) { closed = true; source.close(); }
    }
    function finish() {
      close();
      if (handlers.done) { handlers.done(); }
    }
    function dispatch(name) {
      return function (event) {
        if (closed) { return; }
        if (event.data === "[DONE]") { finish(); return; }
        var handler = handlers[name] || handlers.message;
        if (handler) { handler(parse(event.data), event); }
        if (handlers.ended && handlers.ended()) { finish(); }
      };
    }

    source.onmessage = dispatch("message");
    Object.keys(handlers).forEach(function (name) {
      if (["message", "ended", "done", "error"].indexOf(name) === -1) {
        source.addEventListener(name, dispatch(name));
      }
    });
    source.onerror = function (event) {
      if (closed) { return; }
      if (handlers.error) { handlers.error(event); }
      // A 401 (the session ended) or a stream that closed after the run ended: stop instead of reconnecting.
      if (source.readyState === EventSource.CLOSED || (handlers.ended && handlers.ended())) { finish(); }
    };
    return { close: close };
  }

  /* ---- core: polling -------------------------------------------------------------------------------------------
   * Elements marked data-poll that htmx polls (hx-trigger="every Ns"): the runs table's body, a run's detail, a
   * session's detail. A swap replaces what is inside them, so
   *  - a poll is skipped while focus is inside the element (the swap would drop it to <body>) or the tab is hidden;
   *    an answer that comes once focus went in is not swapped in unless focus can be put back on the same link;
   *  - after a failed poll the element waits twice as long as before (up to MAX_BACKOFF_MS), from its interval;
   *  - data-fingerprint goes with each request as X-Console-Fingerprint: the server answers 204 (htmx swaps
   *    nothing) when it is the fingerprint of what it would send, and sends the new one in the same header;
   *  - data-announce="ID": after a swap, how many rows ([data-id]) are new is said in the role=status element #ID
   *    (the element itself is not a live region: re-reading it at each poll would flood a screen reader).
   */
  var MAX_BACKOFF_MS = 30000;
  var FINGERPRINT = "X-Console-Fingerprint";

  function polled(elt) { return Boolean(elt && elt.hasAttribute && elt.hasAttribute("data-poll")); }

  function pollState(elt) {
    if (!elt.__flowpoolPoll) { elt.__flowpoolPoll = { failures: 0, until: 0, ids: null, focus: null }; }
    return elt.__flowpoolPoll;
  }

  function pollInterval(elt) {
    var found = /every\s+(\d+(?:\.\d+)?)(ms|s)\b/.exec(elt.getAttribute("hx-trigger") || "");
    return found ? parseFloat(found[1]) * (found[2] === "s" ? 1000 : 1) : 2000;
  }

  function focusInside(elt) {
    var active = document.activeElement;
    return Boolean(active && active !== document.body && elt.contains(active));
  }

  /* A selector that finds the focused element again in new content: its id, or a link's href. */
  function focusKey(active) {
    if (active.id) { return "#" + CSS.escape(active.id); }
    if (active.getAttribute("href")) { return 'a[href="' + CSS.escape(active.getAttribute("href")) + '"]'; }
    return null;
  }

  function rowIds(elt) {
    var ids = {};
    var rows = elt.querySelectorAll("[data-id]");
    for (var i = 0; i < rows.length; i++) { ids[rows[i].getAttribute("data-id")] = true; }
    return ids;
  }

  function whenFocusLeaves(elt, then) {
    elt.addEventListener("focusout", function left() {
      window.setTimeout(function () {
        if (focusInside(elt)) { return; }
        elt.removeEventListener("focusout", left);
        then();
      }, 0);
    });
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (!polled(elt)) { return; }
    if (document.visibilityState === "hidden" || focusInside(elt) || Date.now() < pollState(elt).until) {
      event.preventDefault();
    }
  });

  document.addEventListener("htmx:configRequest", function (event) {
    var elt = event.detail.elt;
    if (polled(elt) && elt.getAttribute("data-fingerprint")) {
      event.detail.headers[FINGERPRINT] = elt.getAttribute("data-fingerprint");
    }
  });

  document.addEventListener("htmx:beforeSwap", function (event) {
    var elt = event.detail.elt;
    if (!polled(elt) || !event.detail.shouldSwap) { return; }
    var state = pollState(elt);
    state.focus = null;
    if (focusInside(elt)) {
      // Focus went in while the request was on its way: swap only if the same link can be focused again.
      var key = focusKey(document.activeElement);
      var fragment = document.createElement("template");
      fragment.innerHTML = event.detail.serverResponse || "";
      if (!key || !fragment.content.querySelector(key)) {
        event.detail.shouldSwap = false;
        state.skipped = true;
        return;
      }
      state.focus = key;
    }
    state.ids = elt.hasAttribute("data-announce") ? rowIds(elt) : null;
  });

  document.addEventListener("htmx:afterSwap", function (event) {
    var elt = event.detail.elt;
    if (!polled(elt)) { return; }
    var state = pollState(elt);
    if (state.focus) {
      var again = elt.querySelector(state.focus);
      if (again) { again.focus({ preventScroll: true }); }
      state.focus = null;
    }
    var status = document.getElementById(elt.getAttribute("data-announce") || "");
    if (status && state.ids) {
      var now = rowIds(elt);
      var fresh = 0;
      Object.keys(now).forEach(function (id) { if (!state.ids[id]) { fresh += 1; } });
      status.textContent = fresh ? fresh + (fresh === 1 ? " new run" : " new runs") : "";
    }
    state.ids = null;
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    var elt = event.detail.elt;
    if (!polled(elt)) { return; }
    var state = pollState(elt);
    if (event.detail.successful === true) {
      state.failures = 0;
      state.until = 0;
      var print = event.detail.xhr && event.detail.xhr.getResponseHeader(FINGERPRINT);
      // A fingerprint of rows not swapped in (focus went in meanwhile) would make the next poll a 204 wrongly.
      if (print && !state.skipped) { elt.setAttribute("data-fingerprint", print); }
      if (state.skipped && event.detail.xhr.status === 286) {
        // The last answer (htmx stops polling at a 286) was not swapped in: ask again once focus has left.
        whenFocusLeaves(elt, function () {
          window.htmx.ajax("GET", elt.getAttribute("hx-get"), { source: elt, target: elt, swap: "innerHTML" });
        });
      }
    } else {
      state.failures += 1;
      var wait = Math.min(pollInterval(elt) * Math.pow(2, state.failures), MAX_BACKOFF_MS);
      state.until = Date.now() + wait - pollInterval(elt);
    }
    state.skipped = false;
  });

  /* ---- core: keyboard ---------------------------------------------------------------------------------------- */

  /* "/" focuses the page's filter or search input ([data-hotkey-focus]) unless one is being typed in. */
  document.addEventListener("keydown", function (event) {
    if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) { return; }
    var active = document.activeElement;
    var tag = active ? active.tagName : "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (active && active.isContentEditable)) { return; }
    var target = document.querySelector("[data-hotkey-focus]");
    if (target) {
      event.preventDefault();
      target.focus();
      if (target.select) { target.select(); }
    }
  });

  /* ---- core: start-up ------------------------------------------------------------------------------------------- */

  document.addEventListener("DOMContentLoaded", function () { localiseTimes(document); });
  // The whole page, not just the swap's target: an outerHTML swap replaces the target it names.
  document.addEventListener("htmx:afterSwap", function () { localiseTimes(document); });
  if (document.readyState !== "loading") { localiseTimes(document); }

  window.FlowpoolConsole = {
    csrf: csrf,
    follow: follow,
    localiseTimes: localiseTimes
  };
})();
