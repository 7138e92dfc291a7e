// Pure formatting of figures for a person: no DOM, no network.

/** Bytes as "12.3 MiB". */
export function bytes(value) {
  if (value === null || value === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  let amount = value;
  while (amount >= 1024 && unit < units.length - 1) {
    amount /= 1024;
    unit += 1;
  }
  return `${amount.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** Seconds as "4s", "3m 12s", "2h 05m", "3d 4h". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
  }
  return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
}

/** A percentage as "12.5 %". */
export function percent(value) {
  if (value === null || value === undefined) return "";
  return `${value.toFixed(1)} %`;
}

/** How a child ended, as "exit 1" or "SIGKILL". */
export function exitText(exit) {
  if (!exit) return "";
  return exit.signal ? exit.signal : `exit ${exit.code}`;
}

/** An ISO 8601 time as the local time of day. */
export function clock(iso) {
  if (!iso) return "";
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleTimeString();
}

/** The states a process can be in, by the colour class the table shows them with. */
export const STATE_CLASS = {
  running: "ok",
  pending: "busy", downloading: "busy", unpacking: "busy", building: "busy",
  releasing: "busy", starting: "busy", stopping: "busy",
  backoff: "warn", exited: "warn",
  failed: "bad",
  stopped: "idle",
};

/** Whether a status document shows a process that keeps crashing, or did for good. */
export function inTrouble(doc) {
  return ["backoff", "failed", "exited"].includes(doc.state);
}
