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
