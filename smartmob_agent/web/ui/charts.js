// Host statistics as live charts, drawn on <canvas>: the `host-stats` WebSocket pushes a
// snapshot every `interval` seconds (the user picks it; the agent takes 0.5 s to 3600 s).

import { el, replace } from "./dom.js";
import * as fmt from "./format.js";

/** Snapshots kept per chart (the x axis). */
const HISTORY = 120;
/** The fewest points the x axis is divided for. */
const MIN_SPAN = 12;
/** The most series a chart names one by one. */
const MAX_LEGEND = 8;
const INTERVALS = [0.5, 1, 2, 5, 10, 30, 60];
const COLOURS = ["#2f7de1", "#e1762f", "#2fae5b", "#b13fd1", "#d1b13f", "#3fc6d1",
  "#d13f6b", "#6b8e23"];

/** The figures of one snapshot (see the docs' "Host statistics") the charts draw: pure. */
export function figures(snapshot) {
  const cpu = snapshot.cpu || {};
  const memory = snapshot.memory || {};
  const swap = snapshot.swap || {};
  const share = (part, whole) => (whole ? (100 * part) / whole : 0);
  return {
    cores: cpu.per_core || [], // null before the first window was measured
    cpuTotal: cpu.percent ?? null,
    memory: share(memory.used, memory.total),
    memoryText: `${fmt.bytes(memory.used)} of ${fmt.bytes(memory.total)}`,
    swap: share(swap.used, swap.total),
    swapText: swap.total ? `${fmt.bytes(swap.used)} of ${fmt.bytes(swap.total)}` : "no swap",
    load: snapshot.load || [0, 0, 0],
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
  // the newest point at the right edge; a short history is spread over at least
  // MIN_SPAN points, so the first snapshots draw lines, not a dot at the edge
  const longest = Math.max(0, ...series.map(({ values }) => values.length));
  const step = width / (Math.min(HISTORY, Math.max(longest, MIN_SPAN)) - 1);
  context.lineWidth = 1.5;
  for (const { values, colour } of series) {
    const points = values.map((value, index) => [
      width - (values.length - 1 - index) * step,
      height - (Math.min(value, top) / top) * (height - 2) - 1,
    ]);
    if (points.length === 0) continue;
    if (points.length === 1) { // the first snapshot: a dot until there is a line
      context.fillStyle = colour;
      context.beginPath();
      context.arc(points[0][0] - 2, points[0][1], 2, 0, 2 * Math.PI);
      context.fill();
      continue;
    }
    context.beginPath();
    points.forEach(([x, y], index) => (index === 0 ? context.moveTo(x, y) : context.lineTo(x, y)));
    context.strokeStyle = colour;
    context.stroke();
    if (series.length === 1) { // one series: fill under it, so a low figure still shows
      context.lineTo(points[points.length - 1][0], height);
      context.lineTo(points[0][0], height);
      context.closePath();
      context.globalAlpha = 0.18;
      context.fillStyle = colour;
      context.fill();
      context.globalAlpha = 1;
    }
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
    // a legend per series while it fits (a machine may have dozens of cores)
    replace(this.legend, points.length > MAX_LEGEND ? `${points.length} series`
      : points.map((point, index) => el("span", { class: "key" },
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
    this.host = el("span", { class: "host" }, "waiting for the first snapshot…");
    this.problem = el("span", { class: "problem", role: "alert" });
    this.charts = {
      cpu: new Chart("cpu", "CPU per core (%)"),
      memory: new Chart("memory", "Memory (%)"),
      swap: new Chart("swap", "Swap (%)"),
      load: new Chart("load", "Load average"),
    };
    this.root = el("div", { class: "host-stats" },
      el("div", { class: "host-bar" }, el("h2", {}, "Host"), this.host, this.problem,
        this.interval, this.pause),
      el("div", { class: "chart-grid" }, Object.values(this.charts).map((chart) => chart.root)));
  }

  /** Follow the snapshots of `link` (again, after a reconnection of the agent). */
  start(link = this.link) {
    this.stop();
    this.link = link;
    const socket = new WebSocket(this.api.socketUrl(link, { interval: this.interval.value }));
    this.socket = socket;
    socket.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      if (frame.type === "snapshot") this.draw(frame);
      else if (frame.type === "settings") this.settings(frame);
      else if (frame.type === "error") this.problem.textContent = frame.error;
    };
    // a reconnection keeps the pause the user asked for
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
    this.send(this.paused ? { start: true } : { stop: true });
  }

  /** What the agent says is in force: the interval, and whether it is paused. */
  settings(frame) {
    this.problem.textContent = "";
    this.paused = frame.paused;
    this.pause.textContent = frame.paused ? "Resume" : "Pause";
    this.root.dataset.interval = frame.interval;
    const known = INTERVALS.map(String).includes(String(frame.interval));
    if (!known) this.interval.append(el("option", { value: frame.interval }, `every ${frame.interval} s`));
    this.interval.value = String(frame.interval);
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
