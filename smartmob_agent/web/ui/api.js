// Talking to one agent: its key on every request, errors as sentences a person reads.

/** A request to an agent that failed: `status` 0 when it could not be sent at all. */
export class AgentError extends Error {
  constructor(message, status, fields = null) {
    super(message);
    this.status = status;
    this.fields = fields;
  }
}

/** The origin of a URL, for messages. */
function originOf(url) {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}

/** What to tell the user about an error answer of the agent. */
export function describe(status, body, url) {
  const said = body && typeof body.error === "string" ? body.error : `HTTP ${status}`;
  if (status === 401) {
    return `The agent at ${originOf(url)} refused the key: it is wrong, revoked, or missing. `
      + "Enter the right key for this agent.";
  }
  if (status === 429) {
    return `The agent at ${originOf(url)} refuses keys from here for a while (too many wrong ` +
      `keys): ${said}`;
  }
  return said;
}

/** One agent's API, reached with its key (if any). */
export class Api {
  constructor(url, key) {
    this.url = url;
    this.key = key || "";
  }

  /** GET a URL; resolves to the JSON document. */
  get(url) {
    return this.request("GET", url);
  }

  /** POST a JSON body to a URL; resolves to the JSON document. */
  post(url, body = {}) {
    return this.request("POST", url, body);
  }

  async request(method, url, body) {
    const headers = {};
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, {
        method, headers, mode: "cors", credentials: "omit", cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new AgentError(
        `Cannot reach the agent at ${originOf(url)}: it is not running, or it does not let `
        + `this page in (a page of another origin needs the agent started with a key and `
        + `--allow-origin ${window.location.origin}).`, 0);
    }
    let document = null;
    try {
      document = await response.json();
    } catch {
      document = null;
    }
    if (!response.ok) {
      throw new AgentError(describe(response.status, document, url), response.status,
        document && document.fields ? document.fields : null);
    }
    return document;
  }

  /** The URL to open a WebSocket link with: the key in `token` (browsers cannot set
   * headers on a WebSocket), and the given query parameters. */
  socketUrl(link, params = {}) {
    const url = new URL(link);
    // a link may be http(s):// for a WebSocket (host-stats): not every browser takes it
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
    if (this.key) url.searchParams.set("token", this.key);
    return url.toString();
  }
}
