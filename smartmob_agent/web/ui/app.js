// The page: the agents the user added (kept in this browser's localStorage), one tab
// each, the agent that served the page first.

import { AgentView } from "./agent.js";
import { el } from "./dom.js";

const STORAGE = "smartmob-dashboard.agents";
const ACTIVE = "smartmob-dashboard.active";

/** The agent that served this page: its index is one level above the page (`/ui/`), so
 * the page works behind a proxy that serves the agent under a path of its own. */
const HOME = new URL("../", window.location.href).toString();

/** An agent's URL as typed, made the URL of its index (`http://host:port/`). */
export function normalise(text) {
  const url = new URL(text.includes("://") ? text : `http://${text}`);
  if (!["http:", "https:"].includes(url.protocol)) throw new Error("use an http:// or https:// URL");
  return new URL(url.pathname.endsWith("/") ? url.pathname : `${url.pathname}/`, url.origin)
    .toString();
}

function load() {
  let saved = [];
  try {
    saved = JSON.parse(window.localStorage.getItem(STORAGE) || "[]");
  } catch {
    saved = [];
  }
  const entries = saved.filter((entry) => entry && typeof entry.url === "string");
  if (!entries.some((entry) => entry.url === HOME)) entries.unshift({ url: HOME, key: "" });
  return entries;
}

class Dashboard {
  constructor() {
    this.entries = load();
    this.views = new Map(); // url -> {view, tab}
    this.tabs = document.getElementById("tabs");
    this.panels = document.getElementById("agents");
    this.addForm = document.getElementById("add-agent");
    this.addForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.add();
    });
    for (const entry of this.entries) this.mount(entry);
    this.select(window.localStorage.getItem(ACTIVE) || HOME);
  }

  save() {
    window.localStorage.setItem(STORAGE, JSON.stringify(this.entries));
  }

  label(url) {
    const parsed = new URL(url);
    return url === HOME ? `${parsed.host} (this agent)` : parsed.host;
  }

  mount(entry) {
    const view = new AgentView(entry, () => this.save());
    const dot = el("i", { class: "dot" });
    const tab = el("button", { type: "button", role: "tab", class: "tab", "data-url": entry.url,
      onclick: () => this.select(entry.url) }, dot, this.label(entry.url));
    if (entry.url !== HOME) {
      tab.append(el("span", { class: "remove", title: "remove this agent from the page",
        onclick: (event) => {
          event.stopPropagation();
          this.remove(entry.url);
        } }, "×"));
    }
    view.onStatus = (status) => { tab.dataset.status = status; };
    view.setStatus("connecting", "Connecting…");
    this.tabs.append(tab);
    this.panels.append(view.root);
    this.views.set(entry.url, { view, tab });
    view.connect();
  }

  select(url) {
    const chosen = this.views.has(url) ? url : HOME;
    for (const [key, { view, tab }] of this.views) {
      view.root.hidden = key !== chosen;
      tab.setAttribute("aria-selected", String(key === chosen));
    }
    window.localStorage.setItem(ACTIVE, chosen);
  }

  add() {
    const data = new FormData(this.addForm);
    const problem = this.addForm.querySelector(".form-error");
    let url;
    try {
      url = normalise(String(data.get("url")).trim());
    } catch (error) {
      problem.textContent = `Not an agent URL: ${error.message}`;
      return;
    }
    problem.textContent = "";
    const key = String(data.get("key") || "").trim();
    const known = this.entries.find((entry) => entry.url === url);
    if (known) {
      this.views.get(url).view.useKey(key);
    } else {
      const entry = { url, key };
      this.entries.push(entry);
      this.save();
      this.mount(entry);
    }
    this.addForm.reset();
    this.select(url);
  }

  remove(url) {
    const { view, tab } = this.views.get(url);
    view.close();
    tab.remove();
    this.views.delete(url);
    this.entries = this.entries.filter((entry) => entry.url !== url);
    this.save();
    this.select(HOME);
  }
}

window.dashboard = new Dashboard();
