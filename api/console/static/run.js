/* The flowpool console's run page script (loaded by its template after console.js, whose FlowpoolConsole it uses).
 * No build step; the CSP allows only this origin's files: no eval, no inline handlers. */
/* ---- page: run (/console/runs/<request_id>) ---------------------------------------------------------------------
 * While the run goes, the page has <div data-run-stream="URL" data-run-output="ID">: follow the run's events
 * (chunks as plain messages, log lines as `log` events) from past what the page rendered, and append each to the
 * output list #ID, which no poll replaces (htmx polls only #run-detail). Each item carries its stream entry id
 * (data-entry "c:<id>" for a chunk, "l:<id>" for a log line): one already shown (a reconnect) is skipped.
 * The list follows its newest item while it is scrolled to the bottom (tail mode, [data-tail]), not once the
 * reader scrolled up; it keeps at most data-cap items, dropping the oldest and counting them in #run-output-hidden.
 * At the stream's end, #run-detail is asked for its last render at once ("run-ended"), and #run-announce says so.
 * A [data-copy] button copies its value where the browser has a clipboard (it stays hidden elsewhere).
 */
(function () {
  "use strict";

  var BOTTOM_SLACK = 8;  // px: within this of the end, the list counts as scrolled to the bottom

  function byId(id) { return document.getElementById(id); }

  function say(text) {
    var status = byId("run-announce");
    if (status) { status.textContent = text; }
  }

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

  function atBottom(list) {
    return list.scrollHeight - list.scrollTop - list.clientHeight <= BOTTOM_SLACK;
  }

  function toBottom(list) { list.scrollTop = list.scrollHeight; }

  /* One more earlier item is not shown: the note above the list says how many. */
  function countHidden(n) {
    var note = byId("run-output-hidden");
    if (!note) { return; }
    var hidden = (parseInt(note.getAttribute("data-hidden"), 10) || 0) + n;
    note.setAttribute("data-hidden", String(hidden));
    var count = note.querySelector(".output-hidden-count");
    if (count) { count.textContent = hidden + (hidden === 1 ? " earlier item" : " earlier items") + " not shown"; }
    note.hidden = false;
  }

  /* Append `item` to the output list unless an item with the same entry id is there already. */
  function append(list, entry, item) {
    if (entry && list.querySelector('[data-entry="' + entry.replace(/[^0-9a-z:.\-]/gi, "") + '"]')) { return; }
    if (entry) { item.setAttribute("data-entry", entry); }
    var follow = list.hasAttribute("data-tail") && atBottom(list);
    list.appendChild(item);
    var cap = parseInt(list.getAttribute("data-cap"), 10) || 0;
    var dropped = 0;
    while (cap && list.children.length > cap) { list.removeChild(list.firstElementChild); dropped += 1; }
    if (dropped) { countHidden(dropped); }
    if (follow) { toBottom(list); }
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

  function follow() {
    var holder = document.querySelector("[data-run-stream]");
    if (!holder || !window.FlowpoolConsole) { return; }
    var list = byId(holder.getAttribute("data-run-output") || "run-output");
    if (!list) { return; }
    if (list.hasAttribute("data-tail")) { toBottom(list); }
    var ended = false;
    window.FlowpoolConsole.follow(holder.getAttribute("data-run-stream"), {
      message: function (data, event) {
        if (data && data.object === "workflow.chunk") {
          append(list, "c:" + entryOf(event, 0), chunkItem(data));
        } else if (data && typeof data === "object") {
          ended = true;  // the completion or the error: the run has ended
        }
      },
      log: function (data, event) {
        if (!data || typeof data !== "object") { return; }
        var li = logItem(data);
        append(list, "l:" + entryOf(event, 1), li);
        window.FlowpoolConsole.localiseTimes(li);
      },
      ended: function () { return ended; },
      done: function () {
        var empty = list.parentNode ? list.parentNode.querySelector(".output-empty") : null;
        if (empty && empty.getAttribute("data-ended-text")) { empty.textContent = empty.getAttribute("data-ended-text"); }
        // The last render of the detail now, not at the next poll (it answers 286, which stops the polling).
        var detail = byId("run-detail");
        if (window.htmx && detail && detail.getAttribute("hx-get")) { window.htmx.trigger(detail, "run-ended"); }
      }
    });
  }

  /* Once a poll shows the run has ended (no "live" mark left), say so once. */
  document.addEventListener("htmx:afterSwap", function (event) {
    var detail = event.detail.elt;
    if (!detail || detail.id !== "run-detail" || detail.querySelector(".live-dot")) { return; }
    if (detail.getAttribute("data-announced")) { return; }
    detail.setAttribute("data-announced", "true");
    var badge = detail.querySelector(".run-status-line .badge");
    say("The run has ended: " + (badge ? badge.textContent.replace(/^\W+/, "").trim() : "see its status"));
  });

  function copyButtons() {
    var buttons = document.querySelectorAll("button[data-copy]");
    if (!navigator.clipboard || !navigator.clipboard.writeText) { return; }
    Array.prototype.forEach.call(buttons, function (button) {
      var label = button.textContent;
      button.hidden = false;
      button.addEventListener("click", function () {
        navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
          button.textContent = "Copied";
          say(button.getAttribute("data-copied") || "Copied");
          window.setTimeout(function () { button.textContent = label; }, 2000);
        }, function () {
          say("Could not copy: select the text and copy it instead");
        });
      });
    });
  }

  function start() {
    copyButtons();
    follow();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
/* ---- end of page: run ------------------------------------------------------------------------------------------ */
