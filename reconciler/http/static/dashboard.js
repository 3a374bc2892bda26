// Live updates of a running deployment's page (the page is complete without this script).
// Progress comes from the API's server-sent events; new log lines are read from the log
// endpoint after each event. Every value is inserted as text, never as HTML.
"use strict";
(function () {
  const main = document.querySelector("main[data-events]");
  if (!main || !window.EventSource || !window.fetch) return;
  const timeline = document.getElementById("timeline");
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const note = document.getElementById("live-note");
  let lastEvent = Number(main.dataset.lastEvent) || 0;
  let logNext = Number(main.dataset.logNext) || 0;
  let reading = null;
  let again = false;

  function label(name) { return String(name).replace(/_/g, " "); }

  function statusSpan(name) {
    const span = document.createElement("span");
    span.className = "status status-" + name;
    span.textContent = label(name);
    return span;
  }

  function setStatus(name) {
    status.replaceChildren(statusSpan(name));
  }

  function addEvent(ev) {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = ev.at || "";
    li.append(time, " ", statusSpan(ev.status));
    if (ev.percent !== null && ev.percent !== undefined) {
      const pct = document.createElement("span");
      pct.className = "percent";
      pct.textContent = ev.percent + "%";
      li.append(" ", pct);
    }
    const msg = document.createElement("span");
    msg.className = "message";
    msg.textContent = ev.message;
    li.append(" ", msg);
    timeline.append(li);
  }

  async function readLog() {
    // One read at a time; a request while one runs is served by one more read after it.
    if (reading) { again = true; return reading; }
    reading = (async () => {
      do {
        again = false;
        let next = logNext;
        while (next !== null) {
          const answer = await fetch(main.dataset.logUrl + "?offset=" + next);
          if (!answer.ok) return;
          const page = await answer.json();
          for (const entry of page.lines) {
            const span = document.createElement("span");
            span.className = "line line-" + entry.stream;
            span.textContent = entry.line;
            log.append(span, "\n");
          }
          logNext = page.offset + page.lines.length;
          document.getElementById("log-total").textContent = String(logNext);
          next = page.next_offset;
        }
      } while (again);
    })().finally(() => { reading = null; });
    return reading;
  }

  const source = new EventSource(main.dataset.events);
  source.addEventListener("progress", (message) => {
    const id = Number(message.lastEventId);
    if (id && id <= lastEvent) return; // already on the page
    lastEvent = id || lastEvent;
    const ev = JSON.parse(message.data);
    addEvent(ev);
    setStatus(ev.status);
    readLog();
  });
  source.addEventListener("end", (message) => {
    source.close();
    const record = JSON.parse(message.data);
    setStatus(record.status);
    document.getElementById("error-message").textContent = record.error_message || "-";
    document.getElementById("completed-at").textContent = record.completed_at || "-";
    if (record.duration_seconds !== null) {
      document.getElementById("duration").textContent =
        record.duration_seconds.toFixed(1) + " s (timeout " + record.timeout_seconds + " s)";
    }
    note.textContent = "Finished: " + label(record.status) + ".";
    main.dataset.finished = record.status;
    readLog();
  });
})();
