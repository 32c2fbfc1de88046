// lmfleet's web page: a chat playground over /v1/chat/completions (streamed, cancellable) and a live dashboard
// of the fleet over /v1/fleet (polled every second). Plain browser JavaScript; every URL is relative to the page,
// so the page works behind a proxy that mounts the server under a prefix.
(function () {
  "use strict";

  const $ = function (id) {
    return document.getElementById(id);
  };
  const KEY = "lmfleet.apiKey";
  const state = {
    key: sessionStorage.getItem(KEY) || "",
    history: [], // the conversation: {role, content}
    generation: null, // the AbortController of the reply being streamed
    fleetTimer: null, // null: the dashboard is hidden
    polling: false,
    load: new Map(), // worker address -> recent running+queued samples (this page's own history)
  };

  // -- HTTP ------------------------------------------------------------------------------------------------------

  function api(path, options) {
    options = options || {};
    const headers = Object.assign({}, options.headers);
    if (state.key) headers.Authorization = "Bearer " + state.key;
    return fetch(path, Object.assign({}, options, { headers: headers })).then(function (resp) {
      if (resp.status === 401) askForKey(state.key ? "This key was refused." : "This server needs an API key.");
      return resp;
    });
  }

  async function failure(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // not JSON
    }
    return resp.status + " " + resp.statusText;
  }

  // Server-sent events from a fetch body: yields each event's data.
  async function* events(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer
          .slice(0, end)
          .split("\n")
          .filter(function (line) {
            return line.startsWith("data:");
          })
          .map(function (line) {
            return line.slice(5).replace(/^ /, "");
          })
          .join("\n");
        buffer = buffer.slice(end + 2);
        if (data) yield data;
      }
    }
  }

  // -- API key ---------------------------------------------------------------------------------------------------

  function askForKey(message) {
    $("key-form").hidden = false;
    $("key-status").textContent = message;
    if (!state.key) $("api-key").focus();
  }

  $("api-key").value = state.key;
  if (state.key) $("key-form").hidden = false;
  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY, state.key);
    else sessionStorage.removeItem(KEY);
    $("key-status").textContent = "";
    loadModels();
    if (state.fleetTimer !== null) pollFleet();
  });

  // -- Chat ------------------------------------------------------------------------------------------------------

  async function loadModels() {
    const select = $("model");
    const chosen = select.value;
    let names = [];
    try {
      const resp = await api("v1/models");
      if (!resp.ok) throw new Error(await failure(resp));
      names = (await resp.json()).data.map(function (card) {
        return card.id;
      });
    } catch (err) {
      select.replaceChildren(new Option("(" + err.message + ")", ""));
      return;
    }
    select.replaceChildren.apply(
      select,
      names.map(function (name) {
        return new Option(name, name);
      })
    );
    if (!names.length) select.replaceChildren(new Option("(no model is served)", ""));
    else if (names.indexOf(chosen) >= 0) select.value = chosen;
  }

  function addMessage(role, text) {
    $("empty-chat").hidden = true;
    const box = document.createElement("div");
    box.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : $("model").value || "assistant";
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("div");
    meta.className = "meta";
    box.append(who, body, meta);
    if (role === "user") body.textContent = text;
    else body.innerHTML = window.lmfleetMarkdown.render(text);
    $("messages").appendChild(box);
    scrollDown(true);
    return { box: box, body: body, meta: meta };
  }

  function scrollDown(force) {
    const pane = $("messages");
    if (force || pane.scrollHeight - pane.scrollTop - pane.clientHeight < 80) pane.scrollTop = pane.scrollHeight;
  }

  function busy(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
  }

  async function send() {
    const text = $("prompt").value;
    const model = $("model").value;
    if (!text.trim() || state.generation) return;
    if (!model) {
      addMessage("assistant", "").meta.textContent = "No model to send to: is a worker running?";
      return;
    }
    $("prompt").value = "";
    addMessage("user", text);
    state.history.push({ role: "user", content: text });
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const request = {
      model: model,
      messages: messages.concat(state.history),
      temperature: Number($("temperature").value),
      stream: true,
      stream_options: { include_usage: true },
    };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) request.max_tokens = maxTokens;

    const reply = addMessage("assistant", "");
    reply.box.classList.add("streaming");
    const generation = new AbortController();
    state.generation = generation;
    busy(true);
    const started = performance.now();
    let content = "";
    let firstToken = null;
    let usage = null;
    let finish = null;
    let drawn = false;
    const draw = function () {
      drawn = false;
      reply.body.innerHTML = window.lmfleetMarkdown.render(content);
      scrollDown(false);
    };
    try {
      const resp = await api("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: generation.signal,
      });
      if (!resp.ok) throw new Error(await failure(resp));
      for await (const data of events(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (firstToken === null) firstToken = performance.now();
            content += choice.delta.content;
            if (!drawn) {
              drawn = true;
              requestAnimationFrame(draw);
            }
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      reply.meta.textContent = summary(usage, started, firstToken, finish);
    } catch (err) {
      reply.box.classList.add(err.name === "AbortError" ? "stopped" : "failed");
      reply.meta.textContent = err.name === "AbortError" ? "Stopped." : "Error: " + err.message;
    } finally {
      draw();
      reply.box.classList.remove("streaming");
      state.generation = null;
      busy(false);
      if (content) state.history.push({ role: "assistant", content: content });
      $("prompt").focus();
    }
  }

  function summary(usage, started, firstToken, finish) {
    const parts = [];
    const now = performance.now();
    if (usage) {
      parts.push(usage.completion_tokens + " tokens");
      if (firstToken !== null && usage.completion_tokens > 1 && now > firstToken) {
        parts.push(((usage.completion_tokens - 1) / ((now - firstToken) / 1000)).toFixed(1) + " tok/s");
      }
    }
    if (firstToken !== null) parts.push("first token " + ((firstToken - started) / 1000).toFixed(2) + " s");
    if (finish) parts.push(finish === "length" ? "stopped at max tokens" : "finish: " + finish);
    return parts.join(" · ");
  }

  $("composer").addEventListener("submit", function (event) {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", function () {
    if (state.generation) state.generation.abort();
  });
  $("new-chat").addEventListener("click", function () {
    if (state.generation) state.generation.abort();
    state.history = [];
    $("messages").replaceChildren($("empty-chat"));
    $("empty-chat").hidden = false;
  });
  $("reload-models").addEventListener("click", loadModels);
  $("temperature").addEventListener("input", function () {
    $("temperature-value").textContent = $("temperature").value;
  });

  // -- Fleet dashboard -------------------------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const LOAD_SAMPLES = 120;

  // An inline SVG line of `values` (null: no data), scaled to their maximum.
  function sparkline(values, title, wide) {
    const w = wide ? 300 : 120;
    const h = wide ? 34 : 26;
    const known = values.filter(function (v) {
      return v !== null && v !== undefined;
    });
    const max = Math.max.apply(null, known.concat([0])) || 1;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", wide ? "spark wide" : "spark");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("preserveAspectRatio", "none");
    if (!wide) {
      svg.setAttribute("width", w);
      svg.setAttribute("height", h);
    }
    const step = values.length > 1 ? (w - 2) / (values.length - 1) : 0;
    const points = []; // [x, y] of the steps that have data; gaps are bridged
    values.forEach(function (v, i) {
      if (v !== null && v !== undefined) points.push([1 + i * step, h - 1 - (v / max) * (h - 4)]);
    });
    const xy = function (p) {
      return p[0].toFixed(1) + "," + p[1].toFixed(1);
    };
    let line = "";
    let area = "";
    if (points.length === 1) {
      const [x, y] = points[0];
      line = "M" + xy([x - 2, y]) + " L" + xy([x + 2, y]);
    } else if (points.length > 1) {
      line = "M" + points.map(xy).join(" L");
      area = line + " L" + xy([points[points.length - 1][0], h]) + " L" + xy([points[0][0], h]) + " Z";
    }
    for (const [cls, d] of [["area", area], ["line", line]]) {
      if (!d) continue;
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", cls);
      path.setAttribute("d", d);
      svg.appendChild(path);
    }
    const tip = document.createElementNS(SVG, "title");
    tip.textContent = title + " (max " + fmt(known.length ? max : 0) + ")";
    svg.appendChild(tip);
    return svg;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "—";
    return x >= 100 ? x.toFixed(0) : x.toFixed(digits === undefined ? 1 : digits);
  }

  function seconds(x) {
    if (x === null || x === undefined) return "—";
    return x < 1 ? (x * 1000).toFixed(0) + " ms" : x.toFixed(2) + " s";
  }

  function cell(content, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (content instanceof Node) td.appendChild(content);
    else td.textContent = content;
    return td;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return (i ? n.toFixed(n >= 100 ? 0 : 1) : String(n)) + " " + units[i];
  }

  // A one-model worker: its names. A worker that loads models on demand: each model with its state, memory, pin
  // and last load time, and the memory its models hold against its budget.
  function modelsCell(w) {
    const states = w.model_states || [];
    if (!states.length) return w.models.join(", ") || "—";
    const box = document.createElement("div");
    box.className = "models";
    for (const m of states) {
      const line = document.createElement("div");
      line.className = "model model-" + m.state;
      line.dataset.model = m.name;
      const name = document.createElement("span");
      name.className = "model-name";
      name.textContent = m.name;
      const badge = document.createElement("span");
      badge.className = "model-state";
      badge.textContent = m.state + (m.pinned ? " · pinned" : "");
      const info = [];
      if (m.memory_bytes) info.push(bytes(m.memory_bytes));
      if (m.load_seconds !== null && m.load_seconds !== undefined) info.push("loaded in " + seconds(m.load_seconds));
      const detail = document.createElement("span");
      detail.className = "hint model-detail";
      detail.textContent = info.join(" · ");
      line.append(name, badge, detail);
      box.appendChild(line);
    }
    if (w.memory_bytes !== null && w.memory_bytes !== undefined) {
      const mem = document.createElement("div");
      mem.className = "hint model-memory";
      mem.textContent = bytes(w.memory_bytes) + " of " + bytes(w.memory_budget_bytes) + " held";
      box.appendChild(mem);
    }
    return box;
  }

  function workerRow(w) {
    const samples = state.load.get(w.address) || [];
    samples.push(w.running + w.queued);
    if (samples.length > LOAD_SAMPLES) samples.shift();
    state.load.set(w.address, samples);

    const badge = document.createElement("span");
    badge.className = "state state-" + w.state;
    badge.textContent = w.state;
    if (w.reason) badge.title = w.reason;

    const tps = document.createElement("div");
    tps.className = "with-spark";
    tps.append(document.createTextNode(fmt(w.tokens_per_s)), sparkline(w.tokens_per_s_history, "tokens/s"));

    let kv = "—";
    if (w.kv_cache_usage !== null && w.kv_cache_usage !== undefined) {
      kv = document.createElement("div");
      kv.className = "kv";
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = Math.min(100, Math.max(0, w.kv_cache_usage * 100)).toFixed(1) + "%";
      bar.appendChild(fill);
      kv.append(bar, document.createTextNode((w.kv_cache_usage * 100).toFixed(0) + "%"));
    }

    const hits = w.prefix_cache_hit_rate;
    const hitRate = hits === null || hits === undefined ? "—" : (hits * 100).toFixed(0) + "%";

    const tr = document.createElement("tr");
    tr.dataset.address = w.address;
    tr.dataset.state = w.state;
    tr.append(
      cell(w.address, "address"),
      cell(modelsCell(w)),
      cell(badge),
      cell(String(w.running), "num running"),
      cell(String(w.queued), "num queued"),
      cell(sparkline(samples, "running + queued")),
      cell(tps, "num"),
      cell(kv),
      cell(hitRate, "num cache-hits"),
      cell(w.heartbeat_age_s === null ? "—" : fmt(w.heartbeat_age_s) + " s ago", "num")
    );
    return tr;
  }

  function drawFleet(view) {
    const ready = view.workers.filter(function (w) {
      return w.state === "ready";
    }).length;
    const r = view.requests;
    $("t-workers").textContent = ready + " / " + view.workers.length;
    $("t-controller").textContent = "controller " + view.controller;
    $("t-controller").className = "hint controller-" + view.controller;
    $("t-rps").textContent = fmt(r.per_s, 2);
    $("s-rps").replaceChildren(sparkline(r.per_s_history, "requests/s per " + view.step_s + " s", true));
    $("t-latency").textContent = seconds(r.latency_p50_s) + " · " + seconds(r.latency_p95_s);
    $("s-latency").replaceChildren(sparkline(r.latency_p50_s_history, "latency p50 (s)", true));
    $("t-ttft").textContent = seconds(r.first_token_p50_s);
    $("t-progress").textContent = r.in_progress + " in progress";
    $("fleet-window").textContent =
      "Request figures: this API server, last " + view.window_s / 60 + " minutes. Load: since this page opened.";

    const present = new Set(
      view.workers.map(function (w) {
        return w.address;
      })
    );
    for (const address of Array.from(state.load.keys())) if (!present.has(address)) state.load.delete(address);
    const rows = view.workers.map(workerRow);
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("No worker is registered.", "hint center");
      td.colSpan = 9;
      tr.appendChild(td);
      rows.push(tr);
    }
    document.querySelector("#workers tbody").replaceChildren.apply(document.querySelector("#workers tbody"), rows);
  }

  async function pollFleet() {
    if (state.polling) return; // one poll at a time
    state.polling = true;
    clearTimeout(state.fleetTimer);
    try {
      const resp = await api("v1/fleet");
      if (!resp.ok) throw new Error(await failure(resp));
      drawFleet(await resp.json());
      $("fleet-error").hidden = true;
    } catch (err) {
      $("fleet-error").textContent = "Cannot read the fleet: " + err.message;
      $("fleet-error").hidden = false;
    } finally {
      state.polling = false;
    }
    if (state.fleetTimer !== null) state.fleetTimer = setTimeout(pollFleet, 1000);
  }

  // -- Tabs ------------------------------------------------------------------------------------------------------

  function show() {
    const fleet = location.hash === "#fleet";
    $("chat-view").hidden = fleet;
    $("fleet-view").hidden = !fleet;
    $("tab-chat").classList.toggle("active", !fleet);
    $("tab-fleet").classList.toggle("active", fleet);
    if (fleet && state.fleetTimer === null) {
      state.fleetTimer = 0;
      pollFleet();
    } else if (!fleet && state.fleetTimer !== null) {
      clearTimeout(state.fleetTimer);
      state.fleetTimer = null;
    }
  }

  window.addEventListener("hashchange", show);
  show();
  loadModels();
})();
