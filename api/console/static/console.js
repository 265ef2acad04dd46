/* The flowpool console's one script: no build step, no dependencies beyond htmx.
 *
 * Core (below): local times, live streams (FlowpoolConsole.follow), the "/" hotkey and the CSRF token for fetch().
 * Pages add their own parts at the end, each in a clearly marked block of its own.
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

  /* Rewrite every <time datetime data-local> under `root` (the server wrote UTC text) in the viewer's zone. */
  function localiseTimes(root) {
    var nodes = (root || document).querySelectorAll("time[data-local]");
    for (var i = 0; i < nodes.length; i++) {
      var node = nodes[i];
      var when = new Date(node.getAttribute("datetime"));
      if (isNaN(when.getTime())) { continue; }
      var format = node.getAttribute("data-local") === "time" ? timeFormat : fullFormat;
      node.textContent = format.format(when) + (zone ? " " + zone : "");
      if (!node.title) { node.title = when.toISOString(); }
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

/* ---- pages: each page's block goes below, in a clearly commented section of its own ---------------------------- */

/* ---- page: playground (/console/playground) ------------------------------------------------------------------
 * Switching the workflow fills the textarea with that workflow's example input (from its INPUT_SCHEMA, sent in
 * <script type="application/json" id="playground-workflows">). Invoke (or Ctrl+Enter) checks the JSON here,
 * POSTs it to /console/playground/runs with the session's CSRF token, then follows the run's console stream:
 * chunks and log lines as they come, then the output or the error, and a link to the run's page. When the
 * stream ends without an answer (a run that failed before its first event is answered as plain JSON, which
 * EventSource cannot read), the run's end is asked of /console/playground/runs/<request_id>.
 */
(function () {
  "use strict";

  var MESSAGES_EXAMPLE = '[\n  {"role": "user", "content": ""}\n]';
  var END_TRIES = 60;  // how many times (a second apart) the run's end is asked for once its stream has ended

  function byId(id) { return document.getElementById(id); }

  function show(node, visible) { if (node) { node.hidden = !visible; } }

  function setStatus(status) {
    var badge = byId("playground-run-status");
    badge.textContent = String(status).replace(/_/g, " ");
    badge.className = "badge badge-" + String(status).replace(/_/g, "-");
  }

  function appendLine(list, text) {
    var item = document.createElement("li");
    item.textContent = text;
    list.appendChild(item);
  }

  function asText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function errorText(error) {
    if (!error) { return "unknown error"; }
    var text = (error.type ? error.type + ": " : "") + (error.message || JSON.stringify(error));
    return error.traceback ? text + "\n\n" + error.traceback : text;
  }

  function start() {
    var form = byId("playground-form");
    var dataNode = byId("playground-workflows");
    if (!form || !dataNode) { return; }
    var choices = JSON.parse(dataNode.textContent || "{}");
    var select = byId("playground-workflow");
    var field = byId("playground-field");
    var textarea = byId("playground-input");
    var version = byId("playground-version");
    var session = byId("playground-session");
    var inputError = byId("playground-input-error");
    var button = byId("playground-invoke");
    var statusLine = byId("playground-status");
    var following = null;

    function example() {
      if (field.value === "messages") { return MESSAGES_EXAMPLE; }
      var choice = choices[select.value];
      return choice ? choice.example : "{}";
    }

    function inputProblem(text) {
      inputError.textContent = text;
      show(inputError, Boolean(text));
      if (text) { textarea.setAttribute("aria-invalid", "true"); } else { textarea.removeAttribute("aria-invalid"); }
    }

    select.addEventListener("change", function () {
      var choice = choices[select.value] || {};
      textarea.value = example();
      version.value = "";
      version.placeholder = choice.active_version ? "active: " + choice.active_version
        : "no active version: name one";
      byId("playground-description").textContent = choice.description || "";
      inputProblem("");
      // The address names the workflow, so a reload or a shared link opens the same one.
      if (window.history && window.history.replaceState) {
        window.history.replaceState(null, "", "?workflow=" + encodeURIComponent(select.value));
      }
    });
    field.addEventListener("change", function () {
      textarea.value = example();
      inputProblem("");
    });
    textarea.addEventListener("input", function () { inputProblem(""); });
    form.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        if (!button.disabled) { form.requestSubmit(button); }
      }
    });

    function finish(message) {
      button.disabled = false;
      statusLine.textContent = message || "";
    }

    function showOutput(output) {
      byId("playground-output").textContent = JSON.stringify(output, null, 2);
      show(byId("playground-output-box"), true);
    }

    function showError(error) {
      byId("playground-error").textContent = errorText(error);
      show(byId("playground-error-box"), true);
    }

    /* The run's end, asked again until it has one (a stream can close before the record says so). */
    function fetchEnd(endUrl, tries) {
      fetch(endUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.json(); })
        .then(function (body) {
          var data = body.data;
          if (!data) { showError(body.error); finish(""); return; }
          setStatus(data.status);
          if (!data.ended && tries > 1) {
            window.setTimeout(function () { fetchEnd(endUrl, tries - 1); }, 1000);
            return;
          }
          if (data.error) { showError(data.error); }
          else if (data.ended && byId("playground-output-box").hidden) { showOutput(data.output); }
          finish(data.ended ? "" : "still running: see the run's page");
        })
        .catch(function () { finish("could not read the run's end: see the run's page"); });
    }

    function followRun(started) {
      var chunks = byId("playground-chunks");
      var logs = byId("playground-logs");
      var answered = false;
      var link = byId("playground-run-link");
      link.textContent = started.request_id;
      link.href = started.run_url;
      chunks.textContent = "";
      logs.textContent = "";
      show(byId("playground-output-box"), false);
      show(byId("playground-error-box"), false);
      setStatus("running");
      show(byId("playground-result"), true);
      statusLine.textContent = "running…";
      following = window.FlowpoolConsole.follow(started.stream_url, {
        message: function (data) {
          if (!data || typeof data !== "object") { return; }
          if (data.object === "workflow.chunk") {
            appendLine(chunks, (data.type || "chunk") + ": " + asText(data.content));
          } else if (data.object === "chat.completion") {
            answered = true;
            showOutput(data.output);
          } else if (data.error) {
            answered = true;
            showError(data.error);
          }
        },
        log: function (data) {
          if (data && typeof data === "object") {
            appendLine(logs, (data.level || "info") + " " + (data.msg || "") +
                       (data.fields ? " " + JSON.stringify(data.fields) : ""));
          }
        },
        ended: function () { return answered; },
        done: function () {
          following = null;
          fetchEnd(form.getAttribute("data-end-url") + encodeURIComponent(started.request_id), END_TRIES);
        }
      });
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var value;
      try {
        value = JSON.parse(textarea.value);
      } catch (problem) {
        inputProblem("Not valid JSON: " + problem.message);
        textarea.focus();
        return;
      }
      if (field.value === "messages" && !Array.isArray(value)) {
        inputProblem("messages must be a JSON list of chat messages, like " + MESSAGES_EXAMPLE.replace(/\s+/g, " "));
        textarea.focus();
        return;
      }
      inputProblem("");
      var body = { workflow: select.value };
      body[field.value] = value;
      if (version.value.trim()) { body.version = version.value.trim(); }
      if (session.value.trim()) { body.session_id = session.value.trim(); }
      if (following) { following.close(); following = null; }
      button.disabled = true;
      statusLine.textContent = "starting…";
      fetch(form.getAttribute("data-runs-url"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json",
                   "X-CSRF-Token": window.FlowpoolConsole.csrf() },
        body: JSON.stringify(body)
      }).then(function (response) {
        return response.json().then(function (answer) { return { ok: response.ok, answer: answer, status: response.status }; },
                                    function () { return { ok: false, answer: null, status: response.status }; });
      }).then(function (result) {
        if (result.ok && result.answer && result.answer.request_id) {
          followRun(result.answer);
          return;
        }
        var error = result.answer && result.answer.error;
        var message = error ? errorText(error) : "the console answered " + result.status + ": reload the page";
        if (error && error.code === 401) { message += " (sign in again: /console/sign-in)"; }
        // The input's own problems go next to it; the rest beside the button.
        if (error && error.code === 400 && ["workflow", "version", "session_id"].indexOf(error.param) === -1) {
          inputProblem(message);
          finish("");
        } else {
          finish(message);
        }
      }).catch(function (problem) {
        finish("the request did not reach the console: " + problem.message);
      });
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();

/* ---- page: run (/console/runs/<request_id>) ---------------------------------------------------------------------
 * While the run goes, the page has <div data-run-stream="URL" data-run-output="ID">: follow the run's events
 * (chunks as plain messages, log lines as `log` events) and append each to the output list #ID. The detail
 * fragment around that list is re-rendered by htmx every 2 s with everything so far, so each item carries its
 * stream entry id (data-entry "c:<id>" for a chunk, "l:<id>" for a log line) and one already shown is skipped.
 */
(function () {
  "use strict";

  function entryOf(event, part) {
    var ids = (event && event.lastEventId ? event.lastEventId : "").split(".");
    return ids.length > part ? ids[part] : "";
  }

  function span(className, text) {
    var node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  /* Append `item` to the output list unless an item with the same entry id is there already. */
  function append(outputId, entry, item) {
    var list = document.getElementById(outputId);
    if (!list) { return; }
    if (entry && list.querySelector('[data-entry="' + entry.replace(/[^0-9a-z:.\-]/gi, "") + '"]')) { return; }
    if (entry) { item.setAttribute("data-entry", entry); }
    list.appendChild(item);
    var empty = list.parentNode ? list.parentNode.querySelector(".output-empty") : null;
    if (empty) { empty.parentNode.removeChild(empty); }
  }

  function chunkItem(data) {
    var li = document.createElement("li");
    li.className = "out-chunk";
    li.appendChild(span("out-kind", "chunk"));
    if (data.type) { li.appendChild(document.createTextNode(" ")); li.appendChild(span("out-type", String(data.type))); }
    li.appendChild(document.createTextNode(" "));
    var content = data.content;
    li.appendChild(span("out-content", typeof content === "string" ? content : JSON.stringify(content)));
    return li;
  }

  function logItem(data) {
    var level = String(data.level || "info");
    var li = document.createElement("li");
    li.className = "out-log out-log-" + level.replace(/[^a-z]/gi, "");
    li.appendChild(span("out-kind", "log"));
    li.appendChild(document.createTextNode(" "));
    if (typeof data.time === "number") {
      var time = document.createElement("time");
      var when = new Date(data.time * 1000);
      time.setAttribute("datetime", when.toISOString());
      time.setAttribute("data-local", "time");
      time.textContent = when.toISOString().slice(11, 19) + " UTC";
      li.appendChild(time);
      li.appendChild(document.createTextNode(" "));
    }
    li.appendChild(span("out-level", level.toUpperCase()));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(span("out-msg", String(data.msg == null ? "" : data.msg)));
    if (data.fields && typeof data.fields === "object" && Object.keys(data.fields).length) {
      li.appendChild(document.createTextNode(" "));
      var code = document.createElement("code");
      code.className = "out-fields";
      code.textContent = JSON.stringify(data.fields);
      li.appendChild(code);
    }
    return li;
  }

  function start() {
    var holder = document.querySelector("[data-run-stream]");
    if (!holder || !window.FlowpoolConsole) { return; }
    var outputId = holder.getAttribute("data-run-output") || "run-output";
    var ended = false;
    window.FlowpoolConsole.follow(holder.getAttribute("data-run-stream"), {
      message: function (data, event) {
        if (data && data.object === "workflow.chunk") {
          append(outputId, "c:" + entryOf(event, 0), chunkItem(data));
        } else if (data && typeof data === "object") {
          ended = true;  // the completion or the error: the run has ended
        }
      },
      log: function (data, event) {
        if (!data || typeof data !== "object") { return; }
        var li = logItem(data);
        append(outputId, "l:" + entryOf(event, 1), li);
        window.FlowpoolConsole.localiseTimes(li);
      },
      ended: function () { return ended; },
      done: function () {
        // One last render of the detail now, not at the next poll (it answers 286, which stops the polling).
        var detail = document.getElementById("run-detail");
        if (window.htmx && detail && detail.getAttribute("hx-get")) {
          window.htmx.ajax("GET", detail.getAttribute("hx-get"), { target: detail, swap: "innerHTML" });
        }
      }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
/* ---- end of page: run ------------------------------------------------------------------------------------------ */
