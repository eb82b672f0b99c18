// What this browser remembers for the buyer, and for how long.
//
// * Orders it started and that are not finished, so the checkout can offer the way back to the newest
//   (a day at most: on a shared phone or an internet café the next person must not find it). The order
//   page's address carries the access token in its fragment (#t=…): a fragment is never sent to a
//   server, so the token reaches us only as the bearer header of the page's own API calls.
// * A place in line, so it survives a closed tab: the ticket, the create's Idempotency-Key and fields in
//   localStorage, the chosen file in IndexedDB (it may be megabytes). The checkout opened again within
//   the waiting room's abandon window picks the place up where it was; anything older is deleted.
//
// Storage can fail (private mode, a full phone): every function here then does nothing, and never
// keeps the buyer waiting on it.

const ORDERS = "meterai-orders";
const KEEP = 5;
const ORDER_MAX_AGE_MS = 24 * 3600 * 1000;
const WAITING = "meterai-waiting";
const DB = "meterai";
const STORE = "uploads";
const STORAGE_TIMEOUT_MS = 3000;

export function orderLink(id, token) {
  return "/pesanan/" + encodeURIComponent(id) + "#t=" + encodeURIComponent(token);
}

function readList() {
  try {
    const list = JSON.parse(localStorage.getItem(ORDERS) || "[]");
    return Array.isArray(list) ? list.filter((o) => o && o.id && o.token && Date.now() - (o.at || 0) < ORDER_MAX_AGE_MS) : [];
  } catch (e) { return []; }
}

function save(list) {
  try {
    if (list.length) { localStorage.setItem(ORDERS, JSON.stringify(list.slice(0, KEEP))); } else { localStorage.removeItem(ORDERS); }
  } catch (e) { /* private mode */ }
}

export function recentOrders() {
  const list = readList();
  save(list);  // what is too old is gone for good
  return list.filter((o) => !o.done);
}

export function rememberOrder(id, token) {
  save([{ id, token, at: Date.now() }, ...readList().filter((o) => o.id !== id)]);
}

/** An order that reached a final state no longer needs a "come back" prompt, nor its token kept. */
export function markDone(id) {
  save(readList().filter((o) => o.id !== id));
}

// -- the place in line ------------------------------------------------------------------------------

function withTimeout(promise) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error("storage timeout")), STORAGE_TIMEOUT_MS))]);
}

function database() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
    request.onblocked = () => reject(new Error("blocked"));
  });
}

async function storeFile(value) {
  const db = await database();
  try {
    await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, "readwrite");
      if (value === null) { tx.objectStore(STORE).delete("waiting"); } else { tx.objectStore(STORE).put(value, "waiting"); }
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("aborted"));  // a full disk aborts, it doesn't error
    });
  } finally { db.close(); }
}

async function readFile() {
  const db = await database();
  try {
    return await new Promise((resolve, reject) => {
      const request = db.transaction(STORE).objectStore(STORE).get("waiting");
      request.onsuccess = () => resolve(request.result || null);
      request.onerror = () => reject(request.error);
    });
  } finally { db.close(); }
}

/** Remember a place in line (``fields``: the form's text fields, ``file``: the document). Never throws. */
export async function saveWaiting(ticket, key, fields, file) {
  try {
    await withTimeout(storeFile(file));
    localStorage.setItem(WAITING, JSON.stringify({ ticket, key, fields, name: file.name, at: Date.now() }));
  } catch (e) { forgetWaiting(); }  // the place lasts as long as the tab
}

/** The remembered place if younger than ``maxAgeSeconds`` ({ticket, key, fields, file}); an older one is deleted. */
export async function loadWaiting(maxAgeSeconds) {
  try {
    const saved = JSON.parse(localStorage.getItem(WAITING) || "null");
    if (!saved) { return null; }
    if (!saved.ticket || Date.now() - saved.at > maxAgeSeconds * 1000) { forgetWaiting(); return null; }
    const file = await withTimeout(readFile());
    if (!file) { forgetWaiting(); return null; }
    return { ...saved, file: new File([file], saved.name || "dokumen.pdf", { type: "application/pdf" }) };
  } catch (e) { return null; }
}

/** Still in line (a poll answered): the remembered place is fresh. */
export function touchWaiting() {
  try {
    const saved = JSON.parse(localStorage.getItem(WAITING) || "null");
    if (saved) { saved.at = Date.now(); localStorage.setItem(WAITING, JSON.stringify(saved)); }
  } catch (e) { /* nothing to keep */ }
}

/** Forget the place in line: at once in localStorage (so no page resumes it), the file in the background. */
export function forgetWaiting() {
  try { localStorage.removeItem(WAITING); } catch (e) { /* nothing kept */ }
  withTimeout(storeFile(null)).catch(() => {});
}
