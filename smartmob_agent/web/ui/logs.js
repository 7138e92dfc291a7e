// The log panel: attaches to one process's output (the `attach` WebSocket, JSON frames),
// follows it live, replays its last lines on demand, and sends lines to its stdin.

import { el, replace } from "./dom.js";
import * as fmt from "./format.js";

/** Lines kept on the page; older ones are removed as new ones come. */
const MAX_LINES = 2000;

export class LogPanel {
  constructor() {
    this.slug = null;
    this.socket = null;
    this.lastSeq = null;
    this.title = el("h3", {});
    this.state = el("span", { class: "attach-state" });
    this.lines = el("div", { class: "lines", role: "log" });
    this.follow = el("input", { type: "checkbox", class: "follow", checked: true });
    this.tail = el("select", { class: "tail-count", title: "lines to replay" },
      [0, 50, 200, 1000].map((n) => el("option", { value: n }, `${n} lines`)));
    this.tail.value = "200";
    this.input = el("input", { name: "line", class: "stdin", autocomplete: "off",
      placeholder: "a line for the process's stdin" });
    this.root = el("div", { class: "logs", hidden: true },
      el("div", { class: "logs-bar" }, this.title, this.state,
        el("label", {}, this.follow, "follow"),
        el("label", {}, "replay ", this.tail),
        el("button", { type: "button", class: "replay", onclick: () => this.attach(true) },
          "Replay"),
        el("button", { type: "button", class: "close", onclick: () => this.close() }, "Close")),
      this.lines,
      el("form", { class: "stdin-form", onsubmit: (event) => {
        event.preventDefault();
        this.send();
      } }, this.input, el("button", { type: "submit" }, "Send")));
  }

  /** Show the output of the process of status document `doc`, through `api`. */
  open(api, doc) {
    this.api = api;
    this.doc = doc;
    this.slug = doc.slug;
    this.root.hidden = false;
    this.title.textContent = `Output of ${doc.slug}`;
    this.attach(true);
    this.root.scrollIntoView({ block: "nearest" });
  }

  /** Connect the WebSocket: from the replay asked for (`fresh`), or after the last line
   * seen (a reconnection loses nothing the agent still has, and repeats nothing). */
  attach(fresh) {
    this.detach();
    if (fresh) {
      this.lastSeq = null;
      this.lines.replaceChildren();
    }
    const params = { format: "json" };
    if (this.lastSeq === null) params.tail = this.tail.value;
    else params.after = this.lastSeq;
    const socket = new WebSocket(this.api.socketUrl(this.doc.attach, params));
    this.socket = socket;
    this.setState("attaching…");
    socket.onopen = () => this.setState("live", "live");
    socket.onmessage = (message) => this.receive(JSON.parse(message.data));
    socket.onclose = (close) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.setState(`detached (${close.code}); reattaching…`, "off");
      this.retry = setTimeout(() => this.attach(false), 2000);
    };
  }

  detach() {
    clearTimeout(this.retry);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.close();
    }
  }

  setState(text, kind = "") {
    this.state.textContent = text;
    this.state.className = `attach-state ${kind}`;
  }

  receive(frame) {
    let line;
    if (frame.event) {
      line = el("div", { class: "marker" }, this.marker(frame));
    } else {
      this.lastSeq = frame.seq;
      line = el("div", { class: `line ${frame.stream}`, title: `${frame.at} pid ${frame.pid}` },
        frame.line);
    }
    this.lines.append(line);
    while (this.lines.childElementCount > MAX_LINES) this.lines.firstElementChild.remove();
    if (this.follow.checked) this.lines.scrollTop = this.lines.scrollHeight;
  }

  marker(frame) {
    switch (frame.event) {
      case "spawned": return `— started, pid ${frame.pid} (${fmt.clock(frame.at)})`;
      case "exited": return `— ended: ${fmt.exitText(frame)} (pid ${frame.pid})`;
      case "backoff": return `— next start in ${frame.delay} s`;
      case "dropped": return `— ${frame.count} line(s) not shown`;
      case "notice": return `— ${frame.message}`;
      case "replaying": return `— catching up from line ${frame.from}`;
      case "live": return "— live";
      default: return `— ${frame.event}`;
    }
  }

  send() {
    const text = this.input.value;
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
      this.setState("not attached: the line was not sent", "off");
      return;
    }
    this.socket.send(text);
    this.lines.append(el("div", { class: "sent" }, `> ${text}`));
    this.input.value = "";
  }

  /** Detach and hide the panel (with `why` shown if given). */
  close(why = "") {
    this.detach();
    this.slug = null;
    if (why) {
      replace(this.lines, el("div", { class: "marker" }, why));
      return;
    }
    this.root.hidden = true;
  }
}
