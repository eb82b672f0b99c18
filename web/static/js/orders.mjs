// Orders this browser started, so the checkout page can offer the way back to an unfinished one. The
// order page's address carries the access token in its fragment (#t=…): a fragment is never sent to a
// server, so the token reaches us only as the bearer header of the page's own API calls.

const KEY = "meterai-orders";
const KEEP = 5;

export function orderLink(id, token) {
  return "/pesanan/" + encodeURIComponent(id) + "#t=" + encodeURIComponent(token);
}

export function recentOrders() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list.filter((o) => o && o.id && o.token && !o.done) : [];
  } catch (e) { return []; }
}

function save(list) {
  try { localStorage.setItem(KEY, JSON.stringify(list.slice(0, KEEP))); } catch (e) { /* private mode */ }
}

export function rememberOrder(id, token) {
  let list = [];
  try { list = JSON.parse(localStorage.getItem(KEY) || "[]"); } catch (e) { list = []; }
  if (!Array.isArray(list)) { list = []; }
  save([{ id, token, at: Date.now() }, ...list.filter((o) => o && o.id !== id)]);
}

/** An order that reached a final state no longer needs a "come back" prompt. */
export function markDone(id) {
  let list = [];
  try { list = JSON.parse(localStorage.getItem(KEY) || "[]"); } catch (e) { return; }
  if (!Array.isArray(list)) { return; }
  save(list.map((o) => (o && o.id === id ? { ...o, done: true } : o)));
}

// A place in line survives a closed tab: the ticket, the create's Idempotency-Key and fields in
// localStorage, the chosen file in IndexedDB (it may be megabytes). The checkout page that opens again
// within the waiting room's abandon window picks the place up where it was.
const WAITING = "meterai-waiting";
const DB = "meterai";
const STORE = "uploads";

function database() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function storeFile(value) {
  const db = await database();
  await new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, "readwrite");
    if (value === null) { tx.objectStore(STORE).delete("waiting"); } else { tx.objectStore(STORE).put(value, "waiting"); }
    tx.oncomplete = resolve;
    tx.onerror = () => reject(tx.error);
  });
  db.close();
}

async function readFile() {
  const db = await database();
  const value = await new Promise((resolve, reject) => {
    const request = db.transaction(STORE).objectStore(STORE).get("waiting");
    request.onsuccess = () => resolve(request.result || null);
    request.onerror = () => reject(request.error);
  });
  db.close();
  return value;
}

/** Remember a place in line: ``fields`` are the form's text fields, ``file`` the chosen document. */
export async function saveWaiting(ticket, key, fields, file) {
  try {
    await storeFile(file);
    localStorage.setItem(WAITING, JSON.stringify({ ticket, key, fields, name: file.name, at: Date.now() }));
  } catch (e) { /* private mode: the place lasts as long as the tab */ }
}

/** The remembered place, if it is younger than ``maxAgeSeconds``: {ticket, key, fields, file}. */
export async function loadWaiting(maxAgeSeconds) {
  try {
    const saved = JSON.parse(localStorage.getItem(WAITING) || "null");
    if (!saved || !saved.ticket || Date.now() - saved.at > maxAgeSeconds * 1000) { return null; }
    const file = await readFile();
    return file ? { ...saved, file: new File([file], saved.name || "dokumen.pdf", { type: "application/pdf" }) } : null;
  } catch (e) { return null; }
}

/** Still in line (a poll answered): the remembered place is fresh. */
export function touchWaiting() {
  try {
    const saved = JSON.parse(localStorage.getItem(WAITING) || "null");
    if (saved) { saved.at = Date.now(); localStorage.setItem(WAITING, JSON.stringify(saved)); }
  } catch (e) { /* nothing to keep */ }
}

export async function forgetWaiting() {
  try { localStorage.removeItem(WAITING); await storeFile(null); } catch (e) { /* nothing kept */ }
}
