// Host statistics as live charts, drawn on <canvas>: the `host-stats` WebSocket pushes a
// snapshot every `interval` seconds (the user picks it; the agent takes 0.5 s to 3600 s).

import { el, replace } from "./dom.js";
import * as fmt from "./format.js";

/** Snapshots kept per chart (the x axis). */
const HISTORY = 120;
const INTERVALS = [0.5, 1, 2, 5, 10, 30, 60];
const COLOURS = ["#2f7de1", "#e1762f", "#2fae5b", "#b13fd1", "#d1b13f", "#3fc6d1",
  "#d13f6b", "#6b8e23"];

/** The figures of one snapshot the charts draw: pure, so a change of the snapshot's shape
 * is met here only. */
export function figures(snapshot) {
  const cpu = snapshot.cpu || {};
  const memory = snapshot.memory || {};
  const swap = snapshot.swap || {};
  const load = snapshot.load_average || snapshot.load || [];
  const loads = Array.isArray(load) ? load : [load["1"] ?? load.one, load["5"] ?? load.five,
    load["15"] ?? load.fifteen];
  const share = (part, whole) => (whole ? (100 * part) / whole : 0);
  return {
    cores: cpu.per_core || cpu.percpu || cpu.cores || [],
    cpuTotal: cpu.total ?? cpu.percent ?? null,
    memory: share(memory.used ?? (memory.total - memory.available), memory.total),
    memoryText: `${fmt.bytes(memory.used)} of ${fmt.bytes(memory.total)}`,
    swap: share(swap.used, swap.total),
    swapText: swap.total ? `${fmt.bytes(swap.used)} of ${fmt.bytes(swap.total)}` : "no swap",
    load: loads.map((value) => value ?? 0),
  };
}

/** Draw `series` (`[{values, colour}]`, newest last) from 0 to `top` on `canvas`. */
export function drawLines(canvas, series, top) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== width * ratio) canvas.width = width * ratio;
  if (canvas.height !== height * ratio) canvas.height = height * ratio;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  context.strokeStyle = "#dde3ea";
  context.lineWidth = 1;
  for (const fraction of [0.25, 0.5, 0.75]) {
    const y = Math.round(height * fraction) + 0.5;
    context.beginPath();
    context.moveTo(0, y);
    context.lineTo(width, y);
    context.stroke();
  }
  const step = width / (HISTORY - 1);
  context.lineWidth = 1.5;
  for (const { values, colour } of series) {
    context.strokeStyle = colour;
    context.beginPath();
    values.forEach((value, index) => {
      const x = width - (values.length - 1 - index) * step;
      const y = height - (Math.min(value, top) / top) * (height - 2) - 1;
      if (index === 0) context.moveTo(x, y);
      else context.lineTo(x, y);
    });
    context.stroke();
  }
}

/** One chart: a title, the latest figures as text, a canvas. */
class Chart {
  constructor(name, title) {
    this.canvas = el("canvas", { class: "chart-canvas" });
    this.legend = el("span", { class: "legend" });
    this.root = el("figure", { class: `chart ${name}`, "data-chart": name },
      el("figcaption", {}, el("strong", {}, title), this.legend), this.canvas);
    this.series = [];
    this.samples = 0;
  }

  /** Add one value per series (`[{label, value}]`) and draw again up to `top`. */
  push(points, top) {
    points.forEach((point, index) => {
      if (!this.series[index]) this.series[index] = { values: [], colour: COLOURS[index % COLOURS.length] };
      const { values } = this.series[index];
      values.push(point.value);
      if (values.length > HISTORY) values.shift();
    });
    this.samples += 1;
    this.root.dataset.samples = this.samples;
    replace(this.legend, points.map((point, index) => el("span", { class: "key" },
      el("i", { style: { background: COLOURS[index % COLOURS.length] } }), point.label)));
    drawLines(this.canvas, this.series.slice(0, points.length),
      top ?? Math.max(1, ...this.series.flatMap((series) => series.values)) * 1.2);
  }
}

export class HostCharts {
  constructor(api, link) {
    this.api = api;
    this.link = link;
    this.socket = null;
    this.interval = el("select", { class: "interval", title: "seconds between snapshots",
      onchange: () => this.setInterval() },
    INTERVALS.map((seconds) => el("option", { value: seconds }, `every ${seconds} s`)));
    this.interval.value = "1";
    this.paused = false;
    this.pause = el("button", { type: "button", class: "pause",
      onclick: () => this.togglePause() }, "Pause");
    this.host = el("span", { class: "host" });
    this.charts = {
      cpu: new Chart("cpu", "CPU per core (%)"),
      memory: new Chart("memory", "Memory (%)"),
      swap: new Chart("swap", "Swap (%)"),
      load: new Chart("load", "Load average"),
    };
    this.root = el("div", { class: "host-stats" },
      el("div", { class: "host-bar" }, el("h2", {}, "Host"), this.host, this.interval,
        this.pause),
      el("div", { class: "chart-grid" }, Object.values(this.charts).map((chart) => chart.root)));
  }

  /** Follow the snapshots of `link` (again, after a reconnection of the agent). */
  start(link = this.link) {
    this.stop();
    this.link = link;
    const socket = new WebSocket(this.api.socketUrl(link, { interval: this.interval.value }));
    this.socket = socket;
    socket.onmessage = (message) => {
      const snapshot = JSON.parse(message.data);
      if (snapshot.error) this.host.textContent = snapshot.error;
      else this.draw(snapshot);
    };
    socket.onopen = () => { if (this.paused) socket.send(JSON.stringify({ stop: true })); };
  }

  stop() {
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.close();
    }
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  setInterval() {
    this.send({ interval: Number(this.interval.value) });
  }

  togglePause() {
    this.paused = !this.paused;
    this.send(this.paused ? { stop: true } : { start: true });
    this.pause.textContent = this.paused ? "Resume" : "Pause";
  }

  draw(snapshot) {
    const f = figures(snapshot);
    this.host.textContent = [snapshot.hostname,
      snapshot.uptime !== undefined ? `up ${fmt.duration(snapshot.uptime)}` : null,
      f.cpuTotal !== null ? `CPU ${fmt.percent(f.cpuTotal)}` : null]
      .filter(Boolean).join(" · ");
    this.charts.cpu.push(f.cores.map((value, index) => (
      { label: `core ${index} ${value.toFixed(0)} %`, value })), 100);
    this.charts.memory.push([{ label: `${f.memoryText} (${f.memory.toFixed(0)} %)`,
      value: f.memory }], 100);
    this.charts.swap.push([{ label: `${f.swapText} (${f.swap.toFixed(0)} %)`, value: f.swap }],
      100);
    this.charts.load.push(["1 min", "5 min", "15 min"].map((label, index) => (
      { label: `${label} ${(f.load[index] ?? 0).toFixed(2)}`, value: f.load[index] ?? 0 })));
  }
}
