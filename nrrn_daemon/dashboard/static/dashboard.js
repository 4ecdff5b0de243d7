// nrrn-daemon dashboard: polls the JSON API of the server it came from; no other host.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  let pollS = 2;
  const el = (id) => document.getElementById(id);
  const text = (v) => (v === null || v === undefined ? "–" : String(v));
  const num = (v, d = 1) => (typeof v === "number" ? v.toFixed(d) : "–");

  function dl(target, rows) {
    target.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = text(v);
      target.append(dt, dd);
    }
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
    return r.json();
  }

  function setLive(ok, label) {
    const live = el("live");
    live.textContent = label;
    live.className = "live " + (ok ? "ok" : "bad");
  }

  // -- index -------------------------------------------------------------------------------
  async function pollIndex() {
    const health = await getJSON("/api/health");
    pollS = health.poll_s || pollS;
    const ul = el("datasets");
    ul.replaceChildren();
    for (const name of health.datasets) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "/datasets/" + encodeURIComponent(name);
      a.textContent = name;
      li.append(a);
      ul.append(li);
    }
    el("waiting").textContent = health.waiting || (health.datasets.length ? "" : "no data set yet");
    setLive(true, "connected");
  }

  // -- data set ----------------------------------------------------------------------------
  const q = body.dataset.q;
  let selected = null; // slice name shown in the viewer
  let shownKey = null; // what the viewer shows (name + output version)
  let plotKey = null;

  function renderRun(ov) {
    const run = ov.run || {};
    const st = ov.status;
    const alive = run.state === "alive";
    setLive(alive, run.state ? "daemon " + run.state : "no daemon run");
    dl(el("run"), [
      ["state", run.state], ["heartbeat age", run.heartbeat_age_s !== undefined
        ? num(run.heartbeat_age_s) + " s" : null], ["host", run.host], ["pid", run.pid],
      ["device", st.device], ["precision", st.precision], ["version", run.version],
    ]);
    const pace = ov.pace;
    const p = el("pace");
    p.textContent = pace.message;
    p.className = "big " + (pace.keeping_up ? "up" : "behind");
    dl(el("pace-detail"), [
      ["acquisition", pace.acquired_per_h ? num(pace.acquired_per_h, 0) + " slices/h" : null],
      ["denoising", pace.denoised_per_h ? num(pace.denoised_per_h, 0) + " slices/h" : null],
      ["waiting", pace.behind], ["latency median", num(st.latency_s.median, 2) + " s"],
      ["latency p90", num(st.latency_s.p90, 2) + " s"], ["outputs", st.outputs],
    ]);
    dl(el("model"), [
      ["in use", st.model ? st.model.label : null],
      ["sha256", st.model ? st.model.sha256.slice(0, 12) : null],
      ["next fine-tune", st.next_finetune], ["CPU fallback", st.cpu_fallback ? "yes" : "no"],
    ]);
    const qa = st.quality || {};
    const last = qa.last || {};
    dl(el("quality"), [
      ["input noise (last)", num(last.noise_in)], ["output noise (last)", num(last.noise_out)],
      ["IQR in → out", last.iqr_in !== undefined ? num(last.iqr_in) + " → " + num(last.iqr_out)
        : null],
      ["input noise level", num(qa.noise_in_level)], ["flagged slices", (qa.flagged || []).length],
    ]);
  }

  function renderStrip(ov) {
    const strip = el("strip");
    strip.replaceChildren();
    for (const s of ov.slices) {
      const c = document.createElement("span");
      c.className = "cell " + s.state + (s.flagged ? " flagged" : "") +
        (s.name === selected ? " selected" : "");
      c.dataset.name = s.name;
      c.dataset.state = s.state;
      let tip = `${s.name} (z ${s.index}): ${s.state}`;
      if (s.reason) tip += ` — ${s.reason}`;
      if (s.flagged) tip += ` — ${s.flag_reason}`;
      if (s.noise_in !== null) tip += ` — noise ${num(s.noise_in)} → ${num(s.noise_out)}`;
      c.title = tip;
      c.addEventListener("click", () => { el("follow").checked = false; select(s.name, ov); });
      strip.append(c);
    }
    const failed = el("failed");
    failed.replaceChildren();
    for (const f of ov.status.failed) {
      const li = document.createElement("li");
      li.className = "failed-slice";
      li.textContent = `${f.name}: ${f.reason}`;
      failed.append(li);
    }
  }

  async function select(name, ov) {
    selected = name;
    for (const c of el("strip").children) c.classList.toggle("selected", c.dataset.name === name);
    const info = await getJSON(`/api/datasets/${q}/slice?slice=${encodeURIComponent(name)}`);
    const version = info.current ? info.current.version : 0;
    const key = name + "#" + version;
    el("viewer-name").textContent = `${name} (z ${info.index}, ${info.state})`;
    if (key !== shownKey) {
      shownKey = key;
      const base = `/api/datasets/${q}/preview.png?slice=${encodeURIComponent(name)}`;
      el("img-raw").src = base + "&kind=raw";
      if (info.current) el("img-den").src = base + "&kind=denoised&v=" + version;
      else el("img-den").removeAttribute("src");
    }
    renderProvenance(info);
  }

  function renderProvenance(info) {
    const box = el("provenance");
    box.replaceChildren();
    const h = document.createElement("h3");
    h.textContent = "Provenance";
    box.append(h);
    const cur = info.current;
    const rows = [["state", info.state], ["reason", info.reason]];
    if (cur) {
      rows.push(["mode", cur.mode], ["version", `${cur.version} of ${info.versions}`],
        ["why", cur.reason], ["model", cur.model ? cur.model.label : null],
        ["device", cur.device], ["precision", cur.settings.precision],
        ["read / model / write", `${num(cur.timings.read_s, 2)} / ${num(cur.timings.model_s, 2)}` +
          ` / ${num(cur.timings.write_s, 2)} s`], ["latency", num(cur.timings.latency_s, 2) + " s"],
        ["finished", cur.timings.finished_at]);
      for (const i of cur.inputs) rows.push([`input (${i.role})`, i.name]);
      if (cur.quality) {
        rows.push(["noise in → out", `${num(cur.quality.noise_in)} → ${num(cur.quality.noise_out)}`],
          ["flat IQR in → out", `${num(cur.quality.iqr_in)} → ${num(cur.quality.iqr_out)}`]);
        if (cur.quality.flagged) rows.push(["flag", cur.quality.flag_reason]);
      }
      rows.push(["output", cur.path]);
    }
    const table = document.createElement("table");
    for (const [k, v] of rows) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = text(v);
    }
    box.append(table);
  }

  async function pollDataset() {
    const ov = await getJSON(`/api/datasets/${q}`);
    renderRun(ov);
    renderStrip(ov);
    const key = ov.status.outputs + ":" + ov.slices.length;
    if (key !== plotKey) {
      plotKey = key;
      for (const which of ["latency", "throughput", "noise"]) {
        el("plot-" + which).src = `/api/datasets/${q}/plots/${which}.svg?v=${key}`;
      }
    }
    const target = el("follow").checked || !selected ? ov.newest : selected;
    if (target) await select(target, ov);
  }

  // zoom and pan, the two panes together
  function setupViewer() {
    for (const img of [el("img-raw"), el("img-den")]) {
      img.addEventListener("load", () => {
        img.parentElement.style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
      });
    }
    let scale = 1, tx = 0, ty = 0, drag = null;
    const imgs = [el("img-raw"), el("img-den")];
    const apply = () => { for (const i of imgs) i.style.transform =
      `translate(${tx}px, ${ty}px) scale(${scale})`; };
    for (const frame of document.querySelectorAll(".frame")) {
      frame.addEventListener("wheel", (e) => {
        e.preventDefault();
        const r = frame.getBoundingClientRect();
        const mx = e.clientX - r.left, my = e.clientY - r.top;
        const f = e.deltaY < 0 ? 1.25 : 0.8;
        const next = Math.min(32, Math.max(1, scale * f));
        tx = mx - (mx - tx) * (next / scale);
        ty = my - (my - ty) * (next / scale);
        scale = next;
        if (scale === 1) { tx = 0; ty = 0; }
        apply();
      }, { passive: false });
      frame.addEventListener("mousedown", (e) => { drag = [e.clientX - tx, e.clientY - ty]; });
      frame.addEventListener("dblclick", () => { scale = 1; tx = 0; ty = 0; apply(); });
    }
    window.addEventListener("mousemove", (e) => {
      if (drag) { tx = e.clientX - drag[0]; ty = e.clientY - drag[1]; apply(); }
    });
    window.addEventListener("mouseup", () => { drag = null; });
    const viewer = el("viewer"), pos = el("swipe-pos"), den = el("pane-den");
    const clip = () => { den.style.clipPath = viewer.classList.contains("swipe")
      ? `inset(0 0 0 ${pos.value}%)` : ""; };
    el("swipe").addEventListener("change", (e) => {
      viewer.classList.toggle("swipe", e.target.checked);
      pos.hidden = !e.target.checked;
      clip();
    });
    pos.addEventListener("input", clip);
  }

  // -- models ------------------------------------------------------------------------------
  function table(headers, rows) {
    const t = document.createElement("table");
    t.className = "rows";
    const tr = t.insertRow();
    for (const h of headers) { const th = document.createElement("th"); th.textContent = h;
      tr.append(th); }
    for (const r of rows) { const row = t.insertRow(); for (const v of r) row.insertCell()
      .textContent = text(v); }
    return t;
  }

  let modelsKey = null;
  async function pollModels() {
    const report = await getJSON("/api/models");
    const key = JSON.stringify(report);
    setLive(true, "connected");
    if (key === modelsKey) return;
    modelsKey = key;
    const root = el("models");
    root.replaceChildren();
    for (const ds of report.datasets) {
      const h = document.createElement("h2");
      h.textContent = ds.name + " — current: " + text(ds.current);
      root.append(h, table(["label", "kind", "parent", "created", "promoted", "current"],
        ds.models.map((m) => [m.label, m.kind, m.parent, m.created_at, m.promoted_at,
          m.current ? "yes" : ""])));
      root.append(table(["fine-tune", "status", "promoted", "started", "val loss parent",
        "val loss candidate", "reasons", "error"],
      ds.finetunes.map((f) => [f.id, f.status, f.promoted ? "yes" : "no", f.started_at,
        num(f.val_loss_parent, 5), num(f.val_loss_candidate, 5),
        (f.reasons || []).join("; "), f.error])));
      const img = document.createElement("img");
      img.alt = "validation loss";
      img.src = `/api/datasets/${encodeURIComponent(ds.name)}/loss.svg?v=${ds.finetunes.length}`;
      root.append(img);
    }
  }

  const polls = { index: pollIndex, dataset: pollDataset, models: pollModels };
  async function loop() {
    try { await polls[page](); } catch (err) { setLive(false, "error: " + err.message); }
    setTimeout(loop, pollS * 1000);
  }
  if (page === "dataset") setupViewer();
  loop();
})();
