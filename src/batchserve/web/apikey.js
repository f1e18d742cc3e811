// The API key of a server started with --api-key, for the pages (editor, dashboard).
// A request refused with 401 opens a small dialog asking for the key; the key is kept in this
// tab's sessionStorage (it goes when the tab closes, a reload keeps it), sent as
// "Authorization: Bearer KEY" on every request the page makes through batchserveKey.fetch,
// and the refused request is sent again with it.  A server without keys never asks.
"use strict";

window.batchserveKey = (() => {
  const STORAGE = "batchserve.apiKey";
  let asking = null;  // the dialog on screen: every request refused meanwhile waits for its answer
  let declined = false;  // the dialog was cancelled: no more asking until the page is reloaded

  function stored() {
    try {
      return sessionStorage.getItem(STORAGE);
    } catch {
      return null;  // storage disabled: the key is asked for at each refusal
    }
  }

  function store(key) {
    try {
      if (key) sessionStorage.setItem(STORAGE, key);
      else sessionStorage.removeItem(STORAGE);
    } catch {
      // storage disabled: nothing kept
    }
  }

  function withKey(options, key) {
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    return { ...options, headers };
  }

  function button(text, value) {
    const element = document.createElement("button");
    element.textContent = text;
    element.value = value;
    return element;
  }

  // The dialog: a password field, "Use this key" or "Cancel"; resolves to the key, or "" when cancelled.
  function showDialog(refused) {
    return new Promise((resolve) => {
      const dialog = document.createElement("dialog");
      dialog.id = "api-key-dialog";
      dialog.style.cssText = "font: 15px system-ui, sans-serif; padding: 1.2em; border-radius: 8px; border: 1px solid #94a3b8";
      const form = document.createElement("form");
      form.method = "dialog";
      const label = document.createElement("label");
      label.textContent = refused ? "That API key was refused. API key: " : "This server needs an API key: ";
      const input = document.createElement("input");
      Object.assign(input, { type: "password", name: "api-key", autocomplete: "off", required: true, size: 32 });
      label.appendChild(input);
      const cancel = button("Cancel", "cancel");
      cancel.formNoValidate = true;
      const actions = document.createElement("p");
      actions.append(button("Use this key", "ok"), " ", cancel);
      form.append(label, actions);
      dialog.appendChild(form);
      dialog.addEventListener("close", () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        dialog.remove();
        resolve(key);
      });
      document.body.appendChild(dialog);
      dialog.showModal();
      input.focus();
    });
  }

  function ask(refused) {
    if (!asking) {
      asking = showDialog(refused).then((key) => {
        asking = null;
        if (key) store(key);
        else declined = true;
        return Boolean(key);
      });
    }
    return asking;
  }

  // fetch(), with the key; on a 401 ask for one (once for all the page's requests) and send again.
  async function fetchWithKey(url, options = {}) {
    for (;;) {
      const sent = stored();
      const response = await fetch(url, withKey(options, sent));
      if (response.status !== 401 || declined) return response;
      if (stored() !== sent) continue;  // a key was given meanwhile (another request asked): use it
      if (sent) store(null);  // refused: drop it
      if (!(await ask(Boolean(sent)))) return response;
    }
  }

  return { fetch: fetchWithKey };
})();
