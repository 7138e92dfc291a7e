// Building the page: small helpers over the DOM, so the modules stay declarative.

/** An element with attributes (`class`, `on<event>` handlers, properties) and children. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    // through the CSSOM: the page's Content-Security-Policy refuses style attributes
    else if (name === "style") Object.assign(node.style, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  append(node, children);
  return node;
}

/** Append children (strings become text; arrays are flattened; null is skipped). */
export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace every child of `node`. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** Ask the user to confirm `question` in the page's dialog; resolves to true or false. */
export function confirmAction(question, action = "Confirm") {
  const dialog = document.getElementById("confirm");
  dialog.querySelector(".question").textContent = question;
  dialog.querySelector("button[value=yes]").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}
