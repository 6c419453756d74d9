// The mmsearch search page: plain JavaScript over the gateway's HTTP/JSON API
// (POST /v1/search, GET /v1/thumbnail). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "mmsearch.token";

const state = {
  image: null,      // {name, base64, url} of the query image
  likeId: "",       // "more like this": a stored item's id
  page: 0,
  thumbUrls: [],    // object URLs to revoke on the next render
  seq: 0,           // the latest search; older answers are dropped
};

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// --- query image: file input and drag and drop ---------------------------------------

function readImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const dataUrl = String(reader.result);
    state.image = { name: file.name, base64: dataUrl.slice(dataUrl.indexOf(",") + 1), url: dataUrl };
    state.likeId = "";
    showQueryImage();
    runSearch(0);
  };
  reader.readAsDataURL(file);
}

function showQueryImage() {
  const has = state.image !== null;
  $("preview").hidden = !has;
  $("preview").src = has ? state.image.url : "";
  $("preview").alt = has ? state.image.name : "";
  $("drop-hint").hidden = has;
  $("clear-image").hidden = !has;
  $("instruction").disabled = !has;
  $("like").hidden = !state.likeId;
  $("like-id").textContent = state.likeId;
}

$("file").addEventListener("change", (e) => readImage(e.target.files[0]));
$("clear-image").addEventListener("click", () => {
  state.image = null;
  $("file").value = "";
  $("instruction").value = "";
  showQueryImage();
});
$("clear-like").addEventListener("click", () => { state.likeId = ""; showQueryImage(); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) readImage(file);
});

// --- the request ----------------------------------------------------------------------

function pageSize() { return parseInt($("page-size").value, 10) || 24; }

function buildRequest(page) {
  const size = pageSize();
  const target = $("target").value;
  // One more than a page: whether a next page exists, without a count query.
  const req = { target, topK: size + 1, offset: page * size };
  const text = $("q").value.trim();
  const instruction = $("instruction").value.trim();
  if (state.image) {
    const image = { data: state.image.base64 };
    req.query = instruction ? { composed: { image, instruction } } : { image };
  } else if (text) {
    req.query = { text };
  } else if (state.likeId) {
    req.likeId = state.likeId;
  } else {
    return null;
  }
  if (target === "TARGET_HYBRID") req.fusion = { method: $("fusion").value };
  const filter = $("filter").value.trim();
  if (filter) req.filter = filter;
  return req;
}

async function runSearch(page) {
  const req = buildRequest(page);
  if (!req) {
    showError("Type a query, drop an image, or pick \"more like this\" on a hit.");
    return;
  }
  const seq = ++state.seq;
  $("status").textContent = "searching …";
  $("error").hidden = true;
  document.body.classList.add("busy");
  let reply, body;
  try {
    reply = await fetch("/v1/search", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(req),
    });
    body = await reply.json().catch(() => ({}));
  } catch (err) {
    if (seq === state.seq) showError(`The gateway did not answer: ${err}`);
    return;
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
  if (seq !== state.seq) return;
  if (!reply.ok) {
    showError(`${reply.status} ${codeName(body.code)}: ${body.message || reply.statusText}`);
    render([], page, false);
    return;
  }
  const size = pageSize();
  const hits = body.hits || [];
  state.page = page;
  render(hits.slice(0, size), page, hits.length > size, body);
}

const CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];
function codeName(code) { return CODES[code] || "ERROR"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

// --- results --------------------------------------------------------------------------

function render(hits, page, hasNext, body) {
  state.thumbUrls.forEach((u) => URL.revokeObjectURL(u));
  state.thumbUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) grid.appendChild(card(hit));
  if (body) {
    const ms = body.timings && body.timings.totalMs ? ` · ${Math.round(body.timings.totalMs)} ms` : "";
    const first = page * pageSize() + 1;
    $("status").textContent = hits.length
      ? `hits ${first}–${first + hits.length - 1}${ms}`
      : (page ? "no more hits" : "no hits");
  }
  $("pager").hidden = page === 0 && !hasNext;
  $("prev").disabled = page === 0;
  $("next").disabled = !hasNext;
  $("page-no").textContent = `page ${page + 1}`;
}

function card(hit) {
  const el = document.createElement("article");
  el.className = "hit";
  el.dataset.id = hit.id;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  el.appendChild(thumb);
  loadThumbnail(hit, thumb);

  const meta = document.createElement("div");
  meta.className = "meta";
  const head = document.createElement("div");
  head.className = "head";
  head.innerHTML = `<span class="rank"></span> <span class="score"></span>`;
  head.querySelector(".rank").textContent = `#${hit.rank}`;
  head.querySelector(".score").textContent = Number(hit.score).toFixed(4);
  meta.appendChild(head);
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = hit.id;
  id.title = hit.uri || "";
  meta.appendChild(id);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = hit.captionPending ? "(caption pending)" : (hit.caption || "");
  meta.appendChild(caption);
  if (hit.keywords && hit.keywords.length) {
    const kw = document.createElement("div");
    kw.className = "keywords";
    kw.textContent = hit.keywords.join(" · ");
    meta.appendChild(kw);
  }
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "more like this";
  more.addEventListener("click", () => {
    state.likeId = hit.id;
    state.image = null;
    $("file").value = "";
    $("q").value = "";
    showQueryImage();
    runSearch(0);
  });
  meta.appendChild(more);
  el.appendChild(meta);
  return el;
}

function placeholder(box, why) {
  box.replaceChildren();
  box.classList.add("placeholder");
  box.title = why;
  box.textContent = "no preview";
}

async function loadThumbnail(hit, box) {
  // Only items ingested from a file:// URI have a file to show; inline uploads do not.
  if (!(hit.uri || "").toLowerCase().startsWith("file:")) {
    placeholder(box, "ingested as inline bytes: no stored file to show");
    return;
  }
  try {
    const reply = await fetch(`/v1/thumbnail?id=${encodeURIComponent(hit.id)}&size=256`, { headers: authHeaders() });
    if (!reply.ok) {
      const body = await reply.json().catch(() => ({}));
      placeholder(box, body.message || reply.statusText);
      return;
    }
    const url = URL.createObjectURL(await reply.blob());
    state.thumbUrls.push(url);
    const img = document.createElement("img");
    img.alt = hit.id;
    img.src = url;
    box.replaceChildren(img);
  } catch (err) {
    placeholder(box, String(err));
  }
}

// --- wiring ---------------------------------------------------------------------------

$("query-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if ($("q").value.trim()) state.likeId = "";
  showQueryImage();
  runSearch(0);
});
$("target").addEventListener("change", () => {
  $("fusion-label").hidden = $("target").value !== "TARGET_HYBRID";
});
$("prev").addEventListener("click", () => runSearch(Math.max(0, state.page - 1)));
$("next").addEventListener("click", () => runSearch(state.page + 1));
$("token").value = localStorage.getItem(TOKEN_KEY) || "";
$("token").addEventListener("change", () => localStorage.setItem(TOKEN_KEY, $("token").value.trim()));
$("instruction").addEventListener("keydown", (e) => {
  if (e.key === "Enter") { e.preventDefault(); runSearch(0); }
});
$("filter").addEventListener("keydown", (e) => {
  if (e.key === "Enter") { e.preventDefault(); runSearch(0); }
});
document.body.dataset.ready = "1";
