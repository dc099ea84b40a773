// The status page: polls api/live and draws it. Plain DOM (textContent only: names come from the
// broker and are never HTML) and uPlot for the charts. What each chart holds is kept in
// window.outpostPage.drawn and each chart's data-points attribute (the browser test reads them).
"use strict";
(function () {
  const state = { live: null, polls: 0, errors: 0, drawn: { throughput: 0, backlog: 0, latency: {} } };
  window.outpostPage = state;
  const charts = {};
  const $ = (id) => document.getElementById(id);
  const fmt = (v, d) => (v === null || v === undefined ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: d === undefined ? 1 : d }));

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function fill(tableId, rows, render, empty) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const tr = document.createElement("tr");
      render(tr, r);
      body.appendChild(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, empty, "muted").colSpan = $(tableId).tHead.rows[0].cells.length;
      body.appendChild(tr);
    }
  }

  // the data's own span; one point (a histogram that recorded once) gets a minute around it
  function xRange(u) {
    const t = u.data[0];
    if (t.length > 1) return [t[0], t[t.length - 1]];
    const v = t.length ? t[0] : Date.now() / 1000;
    return [v - 30, v + 30];
  }

  function chart(key, el, labels, colors, height) {
    if (charts[key]) return charts[key];
    const opts = {
      width: Math.max(300, el.clientWidth - 4),
      height: height,
      // one point (a histogram that recorded once) gets a minute around it, not an axis of years
      scales: { x: { time: true, range: xRange } },
      series: [{}].concat(labels.map((l, i) => ({ label: l, stroke: colors[i], width: 1.5 }))),
      axes: [{}, { size: 60 }],
      legend: { live: true },
    };
    const data = [[]].concat(labels.map(() => []));
    charts[key] = { plot: new uPlot(opts, data, el), el: el };
    return charts[key];
  }

  function draw(key, el, labels, colors, cols, height) {
    const c = chart(key, el, labels, colors, height || 180);
    c.plot.setData([cols[0]].concat(cols.slice(1)));
    el.dataset.points = String(cols[0].length);
    return cols[0].length;
  }

  function latencyCharts(series) {
    const box = $("latency");
    $("latency-empty").hidden = series.length > 0;
    for (const s of series) {
      const key = "lat:" + s.service + "/" + s.name;
      let el = box.querySelector('[data-key="' + CSS.escape(key) + '"]');
      if (!el) {
        const wrap = document.createElement("div");
        wrap.className = "chart";
        const h = document.createElement("h3");
        h.textContent = s.service + " · " + s.name;
        el = document.createElement("div");
        el.dataset.key = key;
        wrap.append(h, el);
        box.appendChild(wrap);
      }
      state.drawn.latency[s.service + "/" + s.name] = draw(key, el, ["p50 ms", "p99 ms"], ["#2563eb", "#dc2626"], [s.chart.t, s.chart.p50_ms, s.chart.p99_ms], 160);
    }
  }

  function render(d) {
    $("site").textContent = d.site;
    const b = $("broker");
    b.textContent = d.broker_connected ? "broker connected" : "broker not connected";
    b.className = "pill " + (d.broker_connected ? "ok" : "bad");
    $("updated").textContent = "updated " + new Date(d.now_ms).toLocaleTimeString();
    $("readings").textContent = fmt(d.throughput.readings_per_s, 0);
    $("events").textContent = fmt(d.throughput.events_per_s, 0);
    $("dlq-total").textContent = fmt(d.dlq.reduce((a, r) => a + r.count, 0), 0);
    $("waiting").textContent = fmt(d.escalations.waiting, 0);
    $("backlog").textContent = fmt(d.uplink.backlog, 0);

    fill("services", d.services, (tr, s) => {
      cell(tr, s.name);
      cell(tr, s.state || "–", s.state === "online" ? "ok" : "bad");
      cell(tr, s.health || "–", s.health === "ok" ? "ok" : s.health ? "warn" : "");
      cell(tr, fmt(s.messages_per_s), "n");
      cell(tr, fmt(s.cpu_pct), "n");
      cell(tr, fmt(s.rss_mb, 0), "n");
      cell(tr, fmt(s.metrics_age_s), "n");
      cell(tr, s.problems.concat(s.reason ? [s.reason] : []).join("; "), "warn");
    }, "no service reports yet");

    const t = d.throughput;
    state.drawn.throughput = draw("throughput", $("chart-throughput"), ["readings/s", "events/s"], ["#2563eb", "#16a34a"], [t.chart.t, t.chart.readings_per_s, t.chart.events_per_s]);
    latencyCharts(d.latency);

    fill("dlq", d.dlq, (tr, r) => {
      cell(tr, r.service); cell(tr, r.reason); cell(tr, fmt(r.count, 0), "n"); cell(tr, fmt(r.per_s), "n");
    }, "none");
    fill("agents", d.escalations.agents, (tr, a) => {
      cell(tr, a.agent); cell(tr, a.state || "–");
      cell(tr, fmt(a.decisions, 0), "n"); cell(tr, fmt(a.escalations, 0), "n");
      cell(tr, fmt(a.waiting, 0), a.waiting ? "n warn" : "n");
      cell(tr, a.override_rate === null ? "–" : fmt(a.override_rate * 100) + " %", "n");
    }, "no agent reports yet");

    const link = $("link");
    link.textContent = d.uplink.connected === null ? "" : d.uplink.connected ? "connected" : "down";
    link.className = "pill " + (d.uplink.connected === null ? "" : d.uplink.connected ? "ok" : "bad");
    link.hidden = d.uplink.connected === null;
    fill("uplink", d.uplink.streams, (tr, s) => {
      cell(tr, s.stream); cell(tr, fmt(s.backlog, 0), "n"); cell(tr, fmt(s.age_s), "n");
    }, "no uplink reported");
    $("chart-backlog").hidden = !d.uplink.chart.t.length;
    state.drawn.backlog = draw("backlog", $("chart-backlog"), ["backlog"], ["#a15c00"], [d.uplink.chart.t, d.uplink.chart.backlog], 140);

    fill("rollups", d.rollups, (tr, r) => {
      cell(tr, r.measurement);
      cell(tr, Object.entries(r.tags).filter(([k]) => k !== "site").map(([k, v]) => k + "=" + v).join(" "));
      cell(tr, Object.entries(r.fields).map(([k, v]) => k + " " + fmt(v, 2)).join(", "));
    }, "no window closed yet");

    $("ignored").textContent = d.ignored_metrics ? d.ignored_metrics + " malformed metrics messages ignored" : "";
    let total = state.drawn.throughput + state.drawn.backlog;
    for (const k in state.drawn.latency) total += state.drawn.latency[k];
    document.body.dataset.points = String(total);
  }

  async function poll() {
    let wait = 2000;
    try {
      const r = await fetch("api/live", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const d = await r.json();
      state.live = d;
      state.polls += 1;
      wait = d.poll_ms || 1000;
      render(d);
    } catch (e) {
      state.errors += 1;
      const b = $("broker");
      b.textContent = "gateway not answering";
      b.className = "pill bad";
    }
    setTimeout(poll, wait);
  }

  window.addEventListener("resize", () => {
    for (const k in charts) charts[k].plot.setSize({ width: Math.max(300, charts[k].el.clientWidth - 4), height: charts[k].plot.height });
  });
  poll();
})();
