// One agent on the page: its connection (index, listing, events), its process table
// with the actions of each row, its create form, its log panel and host charts.

import { AgentError, Api } from "./api.js";
import { HostCharts } from "./charts.js";
import { confirmAction, el, replace } from "./dom.js";
import * as fmt from "./format.js";
import { LogPanel } from "./logs.js";

/** Seconds between readings of the listing (for the figures: cpu, memory); the states
 * come live from the events WebSocket. */
const POLL_SECONDS = 2;
/** The longest wait before reconnecting to an agent that went away. */
const MAX_RETRY_SECONDS = 10;
const SIGNALS = ["HUP", "INT", "TERM", "USR1", "USR2", "QUIT", "KILL"];
const COLUMNS = ["app", "node", "state", "pid", "uptime", "restarts", "cpu", "memory",
  "port", "reason", ""];

export class AgentView {
  /** `entry` is `{url, key}`; `onKey(key)` saves a key the user gives again. */
  constructor(entry, onKey) {
    this.entry = entry;
    this.onKey = onKey;
    this.api = new Api(entry.url, entry.key);
    this.signalChoice = new Map(); // slug -> the signal picked in its row
    this.processes = new Map(); // slug -> {doc, fetched (performance.now()), row, diagnosis}
    this.generation = 0; // a reconnect makes every callback of the previous one stale
    this.retry = 1;
    this.timers = [];
    this.status = "connecting";
    this.onStatus = () => {};
    this.build();
  }

  build() {
    this.banner = el("div", { class: "banner" });
    this.message = el("div", { class: "message", role: "status" });
    this.chartsBox = el("div", { class: "charts" });
    this.tbody = el("tbody");
    this.createForm = this.buildCreateForm();
    this.logs = new LogPanel();
    this.root = el("section", { class: "agent", "data-url": this.entry.url },
      this.banner,
      this.chartsBox,
      el("div", { class: "toolbar" },
        el("h2", {}, "Processes"),
        el("button", { type: "button", class: "create-toggle",
          onclick: () => { this.createForm.hidden = !this.createForm.hidden; } },
        "New process…"),
        this.message),
      this.createForm,
      el("table", { class: "processes" },
        el("thead", {}, el("tr", {}, COLUMNS.map((name) => el("th", {}, name)))),
        this.tbody),
      this.logs.root);
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  buildCreateForm() {
    const field = (name, label, attributes = {}) => el("label", {}, label,
      el("input", { name, required: true, ...attributes }));
    const form = el("form", { class: "create", hidden: true,
      onsubmit: (event) => { event.preventDefault(); this.create(form); } },
    field("app", "app", { placeholder: "shop" }),
    field("node", "node", { placeholder: "web.0" }),
    field("process_type", "process type", { placeholder: "web" }),
    field("source_url", "source URL", { type: "url", placeholder: "https://…/app.tar.gz" }),
    el("label", { class: "wide" }, "environment (NAME=value, one a line)",
      el("textarea", { name: "env", rows: 2 })),
    el("div", { class: "buttons" },
      el("button", { type: "submit" }, "Create"),
      el("button", { type: "button", onclick: () => { form.hidden = true; } }, "Cancel")),
    el("div", { class: "form-error", role: "alert" }));
    return form;
  }

  // --- connection -------------------------------------------------------------------

  setStatus(status, text = "") {
    this.status = status;
    this.root.dataset.status = status;
    replace(this.banner, text ? el("span", {}, text) : null);
    this.banner.className = `banner ${status}`;
    this.onStatus(status);
  }

  later(seconds, action) {
    this.timers.push(setTimeout(action, seconds * 1000));
  }

  /** Read the index and the listing, then follow the events; on failure, try again. */
  async connect() {
    const generation = ++this.generation;
    this.timers.forEach(clearTimeout);
    this.timers = [];
    if (this.events) this.events.close();
    try {
      this.index = await this.api.get(this.entry.url);
      await this.refreshList(generation);
    } catch (error) {
      if (generation === this.generation) this.failed(error);
      return;
    }
    if (generation !== this.generation) return;
    this.followEvents(generation);
    if (this.index["host-stats"] && !this.charts) {
      this.charts = new HostCharts(this.api, this.index["host-stats"]);
      this.chartsBox.append(this.charts.root);
    }
    if (this.charts) this.charts.start(this.index["host-stats"]);
    this.poll(generation);
  }

  failed(error) {
    this.generation += 1;
    if (this.events) this.events.close();
    if (this.charts) this.charts.stop();
    if (error instanceof AgentError && error.status === 401) {
      this.setStatus("refused", error.message);
      this.banner.append(this.keyForm());
      return; // asking again with the same key would only count more failures
    }
    const wait = this.retry;
    this.retry = Math.min(MAX_RETRY_SECONDS, this.retry * 2);
    this.setStatus("disconnected", `Disconnected. ${error.message} Reconnecting in ${wait} s…`);
    this.later(wait, () => this.connect());
  }

  keyForm() {
    const input = el("input", { type: "password", name: "key", placeholder: "key",
      autocomplete: "off" });
    return el("form", { class: "key-form", onsubmit: (event) => {
      event.preventDefault();
      this.useKey(input.value.trim());
    } }, input, el("button", { type: "submit" }, "Use this key"));
  }

  /** Connect again with another key (kept in the browser's storage). */
  useKey(key) {
    this.entry.key = key;
    this.api = new Api(this.entry.url, key);
    if (this.charts) this.charts.api = this.api;
    this.onKey(key);
    this.retry = 1;
    this.setStatus("connecting", "Connecting…");
    this.connect();
  }

  followEvents(generation) {
    const socket = new WebSocket(this.api.socketUrl(this.index.events));
    this.events = socket;
    socket.onopen = () => {
      if (generation !== this.generation) return;
      this.retry = 1;
      this.setStatus("connected");
    };
    socket.onmessage = (message) => {
      if (generation === this.generation) this.onEvent(JSON.parse(message.data));
    };
    socket.onclose = (close) => {
      if (generation !== this.generation) return;
      this.failed(new AgentError(
        `The agent closed the events stream (${close.code}${close.reason ? `: ${close.reason}` : ""}).`,
        0));
    };
  }

  async poll(generation) {
    this.later(POLL_SECONDS, async () => {
      if (generation !== this.generation) return;
      try {
        await this.refreshList(generation);
      } catch (error) {
        if (generation === this.generation) this.failed(error);
        return;
      }
      this.poll(generation);
    });
  }

  onEvent(event) {
    if (event.event === "events:dropped") {
      this.refreshList(this.generation).catch(() => {});
      return;
    }
    const known = this.processes.get(event.slug);
    if (event.event === "process:delete") {
      this.forget(event.slug);
      return;
    }
    if (known) {
      // at once what the event says; the rest of the document follows
      this.show({ ...known.doc, state: event.state, pid: event.pid, reason: event.reason });
    }
    this.refreshOne(event.slug, known ? known.doc.details : null);
  }

  async refreshOne(slug, details) {
    const generation = this.generation;
    try {
      if (details) this.show(await this.api.get(details));
      else await this.refreshList(generation);
    } catch (error) {
      if (error instanceof AgentError && error.status === 404) this.forget(slug);
    }
  }

  async refreshList(generation) {
    const listing = await this.api.get(this.index.list);
    if (generation !== this.generation) return;
    const seen = new Set();
    for (const doc of listing.processes) {
      seen.add(doc.slug);
      this.show(doc);
    }
    for (const slug of [...this.processes.keys()]) if (!seen.has(slug)) this.forget(slug);
    this.placeholder();
  }

  placeholder() {
    const empty = this.tbody.querySelector(".empty");
    if (this.processes.size === 0 && !empty) {
      this.tbody.append(el("tr", { class: "empty" },
        el("td", { colSpan: COLUMNS.length }, "No process on this agent yet.")));
    } else if (this.processes.size > 0 && empty) {
      empty.remove();
    }
  }

  forget(slug) {
    const known = this.processes.get(slug);
    if (!known) return;
    known.row.remove();
    known.diagnosis.remove();
    this.processes.delete(slug);
    if (this.logs.slug === slug) this.logs.close("The process was deleted.");
    this.placeholder();
  }

  // --- the table --------------------------------------------------------------------

  show(doc) {
    let known = this.processes.get(doc.slug);
    if (!known) {
      known = { row: el("tr", { "data-slug": doc.slug }),
        diagnosis: el("tr", { class: "diagnosis", "data-slug": doc.slug }) };
      this.processes.set(doc.slug, known);
      this.tbody.append(known.row, known.diagnosis);
      this.placeholder();
    }
    known.doc = doc;
    known.fetched = performance.now();
    this.renderRow(known);
  }

  uptime(known) {
    const { doc } = known;
    if (doc.uptime === null || doc.uptime === undefined || doc.state !== "running") return null;
    return doc.uptime + (performance.now() - known.fetched) / 1000;
  }

  renderRow(known) {
    const { doc } = known;
    const state = fmt.STATE_CLASS[doc.state] || "idle";
    replace(known.row,
      el("td", {}, doc.app),
      el("td", {}, doc.node),
      el("td", { class: "state" }, el("span", { class: `badge ${state}` }, doc.state)),
      el("td", { class: "pid num" }, doc.pid ?? ""),
      el("td", { class: "uptime num" }, fmt.duration(this.uptime(known))),
      el("td", { class: "restarts num" }, doc.restarts ?? ""),
      el("td", { class: "cpu num" }, fmt.percent(doc.cpu_percent)),
      el("td", { class: "memory num" }, fmt.bytes(doc.memory_rss)),
      el("td", { class: "port num" }, doc.port ?? ""),
      el("td", { class: "reason" }, doc.reason ?? ""),
      el("td", { class: "actions" }, this.actions(doc)));
    known.row.className = `process ${state}`;
    known.row.dataset.state = doc.state;
    this.renderDiagnosis(known);
  }

  renderDiagnosis(known) {
    const { doc } = known;
    known.diagnosis.hidden = !fmt.inTrouble(doc);
    if (known.diagnosis.hidden) {
      known.diagnosis.replaceChildren();
      return;
    }
    const exits = (doc.exits || []).slice(-3).reverse();
    const retry = doc.next_start_at ? new Date(doc.next_start_at) : null;
    const seconds = retry ? Math.max(0, (retry.getTime() - Date.now()) / 1000) : null;
    replace(known.diagnosis, el("td", { colSpan: COLUMNS.length },
      el("div", { class: "why" },
        doc.error ? el("p", { class: "error" }, doc.error) : null,
        el("p", {},
          retry ? el("span", { class: "retry" },
            `next retry at ${fmt.clock(doc.next_start_at)} (in ${seconds.toFixed(0)} s)`) : null,
          exits.length ? el("span", { class: "exits" }, "last exits: ", exits.map((exit) =>
            `${fmt.exitText(exit)} after ${fmt.duration(exit.ran_for)} at ${fmt.clock(exit.at)}`)
            .join(" · ")) : null),
        (doc.output_tail || []).length
          ? el("pre", { class: "tail" }, doc.output_tail.join("\n")) : null)));
  }

  tick() {
    for (const known of this.processes.values()) {
      const cell = known.row.querySelector(".uptime");
      if (cell) cell.textContent = fmt.duration(this.uptime(known));
      const retry = known.diagnosis.querySelector(".retry");
      if (retry && known.doc.next_start_at) {
        const seconds = Math.max(0, (new Date(known.doc.next_start_at) - Date.now()) / 1000);
        retry.textContent = `next retry at ${fmt.clock(known.doc.next_start_at)} ` +
          `(in ${seconds.toFixed(0)} s)`;
      }
    }
  }

  actions(doc) {
    const button = (label, handler, extra = {}) => el("button", {
      type: "button", class: `act ${label}`, title: `${label} ${doc.slug}`, onclick: handler,
      ...extra }, label);
    // the table is drawn again at each reading: keep the signal the user picked
    const signal = el("select", { class: "signal-name", title: "signal to send",
      onchange: () => { this.signalChoice.set(doc.slug, signal.value); } },
    SIGNALS.map((name) => el("option", { value: name }, name)));
    signal.value = this.signalChoice.get(doc.slug) || "HUP";
    return [
      button("logs", () => this.logs.open(this.api, doc)),
      doc.start ? button("start", () => this.act(doc, "start")) : null,
      doc.stop ? button("stop", () => this.act(doc, "stop", true)) : null,
      doc.restart ? button("restart", () => this.act(doc, "restart", true)) : null,
      doc.signal ? el("span", { class: "signal" }, signal,
        button("signal", () => this.act(doc, "signal", true, { signal: signal.value }))) : null,
      button("delete", () => this.act(doc, "delete", true), { class: "act delete danger" }),
    ];
  }

  async act(doc, relation, confirmFirst = false, body = {}) {
    const what = relation === "signal" ? `send SIG${body.signal} to` : relation;
    if (confirmFirst) {
      const consequence = {
        stop: "Its children are stopped; it stays stopped until started.",
        restart: "Its running child is stopped, then started again.",
        delete: "It is stopped and forgotten, with its files.",
        signal: "The signal goes to its whole process group.",
      }[relation];
      const question = `${what[0].toUpperCase()}${what.slice(1)} ${doc.slug}?`;
      const ok = await confirmAction(`${question} ${consequence}`,
        relation === "signal" ? "Send" : relation[0].toUpperCase() + relation.slice(1));
      if (!ok) return;
    }
    this.say(`${what} ${doc.slug}…`);
    try {
      const answer = await this.api.post(doc[relation], body);
      if (answer && answer.slug) this.show(answer);
      this.say(`${what} ${doc.slug}: done.`);
    } catch (error) {
      this.say(`${what} ${doc.slug}: ${error.message}`, true);
    }
  }

  say(text, error = false) {
    this.message.textContent = text;
    this.message.className = error ? "message error" : "message";
  }

  async create(form) {
    const data = new FormData(form);
    const env = {};
    for (const line of String(data.get("env") || "").split("\n")) {
      const [name, ...rest] = line.split("=");
      if (name.trim()) env[name.trim()] = rest.join("=");
    }
    const request = {
      app: data.get("app"), node: data.get("node"), process_type: data.get("process_type"),
      source_url: data.get("source_url"), env,
    };
    const problem = form.querySelector(".form-error");
    problem.textContent = "";
    try {
      const created = await this.api.post(this.index.create, request);
      this.show(created);
      form.reset();
      form.hidden = true;
      this.say(`created ${created.slug}.`);
    } catch (error) {
      const fields = error.fields ? Object.entries(error.fields)
        .map(([name, why]) => `${name}: ${why}`).join("; ") : "";
      problem.textContent = fields ? `${error.message} (${fields})` : error.message;
    }
  }

  /** Stop every connection and timer (the agent was removed from the page). */
  close() {
    this.generation += 1;
    this.timers.forEach(clearTimeout);
    clearInterval(this.ticker);
    if (this.events) this.events.close();
    if (this.charts) this.charts.stop();
    this.logs.close();
    this.root.remove();
  }
}
