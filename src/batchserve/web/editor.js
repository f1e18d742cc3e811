// The editor: Tab (or the button) asks /autocomplete for 3 suggestions, shown under the cursor;
// arrow keys move the choice, Enter/Tab or a click inserts it at the cursor, Escape closes.
// A new Tab (or Escape) aborts the request still on its way; its reply is never shown.
"use strict";

const editor = document.getElementById("editor");
const list = document.getElementById("suggestions");
const status = document.getElementById("status");
const button = document.getElementById("suggest");
const SUGGESTIONS = 3;

let suggestions = [];
let active = 0;
let pending = null;  // the AbortController of the request in flight

function isOpen() {
  return !list.hidden;
}

function close() {
  list.hidden = true;
  list.replaceChildren();
  suggestions = [];
}

// Where the caret is, in pixels inside the text area: a hidden mirror with the same text up to it.
function caretPosition() {
  const style = getComputedStyle(editor);
  const mirror = document.createElement("div");
  for (const name of ["boxSizing", "width", "padding", "border", "font", "lineHeight", "letterSpacing"]) {
    mirror.style[name] = style[name];
  }
  Object.assign(mirror.style, { position: "absolute", visibility: "hidden", whiteSpace: "pre-wrap", overflowWrap: "break-word" });
  mirror.textContent = editor.value.slice(0, editor.selectionStart);
  const marker = document.createElement("span");
  marker.textContent = "\u200b";
  mirror.appendChild(marker);
  document.body.appendChild(mirror);
  const position = { left: marker.offsetLeft, top: marker.offsetTop + marker.offsetHeight };
  mirror.remove();
  return { left: position.left - editor.scrollLeft, top: position.top - editor.scrollTop };
}

function show(texts) {
  suggestions = texts;
  active = 0;
  list.replaceChildren(...texts.map((text, index) => {
    const item = document.createElement("li");
    item.className = "suggestion";
    item.setAttribute("role", "option");
    item.textContent = text;
    item.addEventListener("mousedown", (event) => { event.preventDefault(); pick(index); });
    return item;
  }));
  const caret = caretPosition();
  list.style.left = `${Math.min(caret.left, editor.clientWidth - 200)}px`;
  list.style.top = `${caret.top + 4}px`;
  list.hidden = false;
  highlight();
}

function highlight() {
  [...list.children].forEach((item, index) => {
    item.classList.toggle("active", index === active);
    item.setAttribute("aria-selected", String(index === active));
  });
}

function pick(index) {
  const text = suggestions[index];
  close();
  if (text === undefined) return;
  const start = editor.selectionStart;
  editor.setRangeText(text, start, editor.selectionEnd, "end");
  editor.focus();
  status.textContent = "";
}

// Drop the request in flight, if any: its fetch is aborted (the browser closes the connection and
// the server frees its rows) and whatever it would still have answered is never shown.
function cancelPending() {
  if (pending) pending.abort();
  pending = null;
}

async function suggest() {
  const context = editor.value.slice(0, editor.selectionStart);
  if (!context.trim()) {
    status.textContent = "type something first";
    return;
  }
  cancelPending();  // a new Tab supersedes the request still on its way
  const controller = new AbortController();
  pending = controller;
  status.textContent = "thinking…";
  try {
    const response = await batchserveKey.fetch("/autocomplete", {  // with the API key, when the server needs one
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        context,
        n: SUGGESTIONS,
        max_tokens: Number(document.getElementById("max-tokens").value) || 12,
        temperature: Number(document.getElementById("temperature").value),
      }),
      signal: controller.signal,
    });
    const body = await response.json();
    if (controller.signal.aborted) return;  // superseded while its body was read: stale, never shown
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    status.textContent = "";
    show(body.suggestions);
  } catch (error) {
    if (!controller.signal.aborted && error.name !== "AbortError") status.textContent = `error: ${error.message}`;
  } finally {
    if (pending === controller) pending = null;  // a newer request's controller stays
  }
}

editor.addEventListener("keydown", (event) => {
  if (isOpen()) {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      active = (active + step + suggestions.length) % suggestions.length;
      highlight();
      return;
    }
    if (event.key === "Enter" || event.key === "Tab") {
      event.preventDefault();
      pick(active);
      return;
    }
    if (event.key === "Escape") {
      event.preventDefault();
      close();
      return;
    }
    if (!["Shift", "Control", "Alt", "Meta"].includes(event.key)) close();  // typing on closes them
  } else if (event.key === "Tab") {
    event.preventDefault();
    suggest();
  } else if (event.key === "Escape" && pending) {
    event.preventDefault();
    cancelPending();  // Escape while suggestions are on their way: none wanted
    status.textContent = "";
  }
});

// Focus gone elsewhere closes the suggestions, unless it came back meanwhile (a click on a field and
// back, then Tab: the suggestions shown since must stay open).
editor.addEventListener("blur", () => setTimeout(() => { if (document.activeElement !== editor) close(); }, 150));
button.addEventListener("click", () => { editor.focus(); suggest(); });
