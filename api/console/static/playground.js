/* The flowpool console's playground page script (loaded by its template after console.js, whose FlowpoolConsole it uses).
 * No build step; the CSP allows only this origin's files: no eval, no inline handlers. */
/* ---- page: playground (/console/playground) ------------------------------------------------------------------
 * Switching the workflow fills the textarea with that workflow's example input (from its INPUT_SCHEMA, sent in
 * <script type="application/json" id="playground-workflows">) and refills the version select from
 * data-versions-url (the active version first, as the empty value). Invoke (or Ctrl+Enter) checks the JSON here,
 * POSTs it to /console/playground/runs with the session's CSRF token, then follows the run's console stream:
 * chunks and log lines as they come (each list shown once it has an item), then the output or the error, and a
 * link to the run's page. When the stream ends without an answer (a run that failed before its first event is
 * answered as plain JSON, which EventSource cannot read), the run's end is asked of
 * /console/playground/runs/<request_id>. The form stays usable while a run is followed: Invoke again stops
 * following the last run and starts the new one; "Stop following" stops without starting one (the run goes on).
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

  /* Append a line to `list` (and show its box, hidden while the list is empty); a log line starts with its time. */
  function appendLine(list, text, when) {
    var item = document.createElement("li");
    if (typeof when === "number" && isFinite(when)) {
      var moment = new Date(when * 1000);
      var time = document.createElement("time");
      time.setAttribute("datetime", moment.toISOString());
      time.setAttribute("data-local", "compact-time");
      time.className = "playground-log-time";
      time.textContent = moment.toISOString().slice(11, 19) + " UTC";
      item.appendChild(time);
      item.appendChild(document.createTextNode(" "));
      window.FlowpoolConsole.localiseTimes(item);
    }
    item.appendChild(document.createTextNode(text));
    list.appendChild(item);
    show(list.parentNode, true);
  }

  function asText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  /* An error's message as people read it; its type (e.g. invalid_request_error) goes in a label or a title. */
  function errorMessage(error) {
    if (!error) { return "unknown error"; }
    return error.message || JSON.stringify(error);
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
    var versionHint = byId("playground-version-hint");
    var session = byId("playground-session");
    var inputError = byId("playground-input-error");
    var button = byId("playground-invoke");
    var stop = byId("playground-stop");
    var statusLine = byId("playground-status");
    var following = null;   // the stream of the run followed ({close()}), while it is open
    var endTimer = null;    // the next ask for the run's end, while one is waiting
    var current = 0;        // the run followed (a count): answers about an earlier one are dropped
    var versionsOf = {};    // the version options of each workflow fetched so far

    function example() {
      if (field.value === "messages") { return MESSAGES_EXAMPLE; }
      var choice = choices[select.value];
      return choice ? choice.example : "{}";
    }

    function inputProblem(text, title) {
      inputError.textContent = text;
      inputError.title = title || "";
      show(inputError, Boolean(text));
      if (text) { textarea.setAttribute("aria-invalid", "true"); } else { textarea.removeAttribute("aria-invalid"); }
    }

    /* The line beside the button: `text`, then optionally a link (e.g. to sign in again). */
    function say(text, title, link) {
      statusLine.textContent = text || "";
      statusLine.title = title || "";
      if (link) {
        statusLine.appendChild(document.createTextNode(" "));
        var anchor = document.createElement("a");
        anchor.href = link.href;
        anchor.textContent = link.text;
        statusLine.appendChild(anchor);
      }
    }

    /* Stop following the run (its stream and the asks for its end); the run itself goes on. */
    function stopFollowing() {
      current += 1;
      if (following) { following.close(); following = null; }
      if (endTimer) { window.clearTimeout(endTimer); endTimer = null; }
      show(stop, false);
    }

    function fillVersions(options) {
      version.textContent = "";
      options.forEach(function (choice) {
        var option = document.createElement("option");
        option.value = choice.value;
        option.textContent = choice.label;
        version.appendChild(option);
      });
      versionHint.textContent = options.length && options[0].active ? "The active version unless you pick another."
        : "No active version yet: a run names one of the drafts.";
    }

    /* Refill the version select with `ref`'s versions (fetched once per workflow). */
    function loadVersions(ref) {
      if (versionsOf[ref]) { fillVersions(versionsOf[ref]); return; }
      version.textContent = "";
      version.disabled = true;
      versionHint.textContent = "Listing the versions…";
      fetch(form.getAttribute("data-versions-url") + encodeURIComponent(ref),
            { headers: { "Accept": "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          return response.json().then(function (body) { return { ok: response.ok, body: body }; });
        })
        .then(function (result) {
          if (select.value !== ref) { return; }  // another workflow was chosen meanwhile
          version.disabled = false;
          if (!result.ok) {
            fillVersions([]);
            versionHint.textContent = "Could not list the versions (" + errorMessage(result.body.error) +
              "): a run takes the active one.";
            return;
          }
          versionsOf[ref] = result.body.data;
          fillVersions(result.body.data);
        })
        .catch(function () {
          if (select.value !== ref) { return; }
          version.disabled = false;
          fillVersions([]);
          versionHint.textContent = "Could not list the versions: a run takes the active one.";
        });
    }

    select.addEventListener("change", function () {
      var choice = choices[select.value] || {};
      textarea.value = example();
      loadVersions(select.value);
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
    stop.addEventListener("click", function () {
      stopFollowing();
      say("Stopped following: the run goes on; its page shows how it ends.");
      button.focus();  // the pressed button is hidden now
    });

    function finish(message, title) {
      show(stop, false);
      say(message, title);
    }

    function showOutput(output) {
      byId("playground-output").textContent = JSON.stringify(output, null, 2);
      show(byId("playground-output-box"), true);
    }

    function showError(error) {
      var type = byId("playground-error-type");
      // A stream's error names its type (invalid_request_error...); a run record's, its kind (ScriptError...).
      var kind = error ? error.type || error.kind || "" : "";
      type.textContent = String(kind).replace(/_/g, " ");
      type.title = String(kind);
      show(type, Boolean(kind));
      byId("playground-error").textContent = errorMessage(error);
      byId("playground-traceback").textContent = error && error.traceback ? error.traceback : "";
      show(byId("playground-traceback"), Boolean(error && error.traceback));
      show(byId("playground-error-box"), true);
    }

    /* The run's end, asked again until it has one (a stream can close before the record says so). */
    function fetchEnd(endUrl, tries, run) {
      endTimer = null;
      fetch(endUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.json(); })
        .then(function (body) {
          if (run !== current) { return; }  // no longer followed
          var data = body.data;
          if (!data) { showError(body.error); finish(""); return; }
          setStatus(data.status);
          if (!data.ended && tries > 1) {
            endTimer = window.setTimeout(function () { fetchEnd(endUrl, tries - 1, run); }, 1000);
            return;
          }
          if (data.error) { showError(data.error); }
          else if (data.ended && byId("playground-output-box").hidden) { showOutput(data.output); }
          finish(data.ended ? "" : "still running: see the run's page");
        })
        .catch(function () { if (run === current) { finish("could not read the run's end: see the run's page"); } });
    }

    function followRun(started, run) {
      var chunks = byId("playground-chunks");
      var logs = byId("playground-logs");
      var answered = false;
      var link = byId("playground-run-link");
      link.textContent = started.request_id;
      link.href = started.run_url;
      chunks.textContent = "";
      logs.textContent = "";
      show(chunks.parentNode, false);
      show(logs.parentNode, false);
      show(byId("playground-output-box"), false);
      show(byId("playground-error-box"), false);
      setStatus("running");
      show(byId("playground-placeholder"), false);
      show(byId("playground-result"), true);
      show(stop, true);
      say("running…");
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
                       (data.fields && Object.keys(data.fields).length ? " " + JSON.stringify(data.fields) : ""),
                       data.time);
          }
        },
        ended: function () { return answered; },
        done: function () {
          if (run !== current) { return; }
          following = null;
          fetchEnd(form.getAttribute("data-end-url") + encodeURIComponent(started.request_id), END_TRIES, run);
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
      if (version.value) { body.version = version.value; }
      if (session.value.trim()) { body.session_id = session.value.trim(); }
      stopFollowing();  // the run followed so far, if any: the new one takes its place
      var run = current;
      button.disabled = true;  // only while the run is being started: one POST at a time
      say("starting…");
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
        button.disabled = false;
        if (run !== current) { return; }
        if (result.ok && result.answer && result.answer.request_id) {
          followRun(result.answer, run);
          return;
        }
        var error = result.answer && result.answer.error;
        var message = error ? errorMessage(error) : "the console answered " + result.status + ": reload the page";
        var title = error && error.type ? error.type : "";
        if (result.status === 401) {
          // The console session has ended: a real link back, which returns here once signed in again.
          var back = "/console/sign-in?next=" + encodeURIComponent(window.location.pathname + window.location.search);
          say("Your console session has ended.", title, { href: back, text: "Sign in again" });
          return;
        }
        // The input's own problems go next to it; the rest beside the button.
        if (error && error.code === 400 && ["workflow", "version", "session_id"].indexOf(error.param) === -1) {
          inputProblem(message, title);
          finish("");
        } else {
          finish(message, title);
        }
      }).catch(function (problem) {
        button.disabled = false;
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
/* ---- end of page: playground ----------------------------------------------------------------------------------- */
