// tpns-batcher status page: refreshes the figures and charts without a reload, runs the lookup
// box, the requeue and sign-out buttons. Shipped in the package (worker/serve/static), no library
// and nothing from a CDN: it must work offline. Every value is written with textContent or as an
// SVG attribute, never as HTML (ids, reasons and messages are user or service data).
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = ["#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                "#17becf", "#7f7f7f", "#bcbd22"];
  var meta = function (name) {
    var m = document.querySelector('meta[name="' + name + '"]');
    return m ? m.getAttribute("content") : null;
  };
  var csrf = meta("csrf-token");
  var refreshMs = 1000 * Number(meta("refresh-seconds") || 2);
  var $ = function (id) { return document.getElementById(id); };
  // how many refreshes this document made: the tests read it to tell a refresh from a reload
  window.tpnsRefreshes = 0;

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  function setText(id, value) { var n = $(id); if (n) n.textContent = String(value); }

  function getJSON(url, options) {
    return fetch(url, Object.assign({credentials: "same-origin", cache: "no-store"}, options || {}))
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
        return r.json().then(function (body) { return {status: r.status, body: body}; });
      });
  }
  function post(url, body) {
    var headers = {"Content-Type": "application/json"};
    if (csrf) headers["X-CSRF-Token"] = csrf;
    return getJSON(url, {method: "POST", headers: headers, body: JSON.stringify(body || {})});
  }

  // -- charts: a few polylines over the last hour, drawn by hand ------------------------------
  var W = 560, H = 170, L = 44, R = 8, T = 22, B = 18;

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function fmt(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return String(Math.round(v * 100) / 100);
  }

  // series: [{name, points: [[epoch s, value or null], ...]}]; now: epoch s of the right edge
  function drawChart(id, series, now) {
    var box = $(id);
    if (!box) return;
    var t0 = now - 3600, max = 0, sum = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p[1] !== null) { max = Math.max(max, p[1]); sum += p[1]; }
      });
    });
    var top = niceMax(max);
    var x = function (t) { return L + (W - L - R) * (t - t0) / 3600; };
    var y = function (v) { return H - B - (H - T - B) * v / top; };
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img"});
    [0, 0.5, 1].forEach(function (f) {
      root.appendChild(svg("line", {x1: L, x2: W - R, y1: y(top * f), y2: y(top * f),
                                    stroke: "#ddd"}));
      root.appendChild(svg("text", {x: L - 4, y: y(top * f) + 3, "text-anchor": "end"},
                           fmt(top * f)));
    });
    [[-60, "-60m"], [-30, "-30m"], [-10, "-10m"], [0, "now"]].forEach(function (m) {
      root.appendChild(svg("text", {x: x(now + 60 * m[0]), y: H - 4,
                                    "text-anchor": m[0] === 0 ? "end" : "middle"}, m[1]));
    });
    series.forEach(function (s, k) {
      var color = COLORS[k % COLORS.length], runs = [], run = [];
      s.points.forEach(function (p) {
        if (p[1] === null) { if (run.length) runs.push(run); run = []; return; }
        run.push(x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
      });
      if (run.length) runs.push(run);
      runs.forEach(function (r) {
        if (r.length === 1) {  // a lone point (one minute of data) would be an invisible line
          var xy = r[0].split(",");
          root.appendChild(svg("circle", {cx: xy[0], cy: xy[1], r: 2.5, fill: color}));
          r.push(r[0]);
        }
        root.appendChild(svg("polyline", {points: r.join(" "), fill: "none", stroke: color,
                                          "stroke-width": 1.5, "data-series": s.name}));
      });
      var lx = L + 6 + k * 110;
      root.appendChild(svg("rect", {x: lx, y: 6, width: 9, height: 9, fill: color}));
      root.appendChild(svg("text", {x: lx + 13, y: 14}, s.name));
    });
    box.replaceChildren(root);
    box.setAttribute("data-sum", String(Math.round(sum * 1000) / 1000));
    box.setAttribute("data-max", String(max));
  }

  // per minute (as a rate per second when `perSecond`) before the seconds window, then per second
  function joined(tl, name, perSecond) {
    var m = tl.minutes, s = tl.seconds, pts = [];
    m[name].forEach(function (v, i) {
      var t = m.start + i * 60;
      if (t + 60 <= s.start) pts.push([t + 30, v === null ? null : (perSecond ? v / 60 : v)]);
    });
    s[name].forEach(function (v, i) { pts.push([s.start + i, v]); });
    return pts;
  }
  function minutely(tl, values) {  // at the middle of each minute (the current one: now)
    return values.map(function (v, i) {
      return [Math.min(tl.minutes.start + i * 60 + 30, tl.now), v];
    });
  }

  function drawCharts(tl) {
    drawChart("chart-flow", [
      {name: "in", points: joined(tl, "in", true)},
      {name: "succeeded", points: joined(tl, "succeeded", true)},
      {name: "failed", points: joined(tl, "failed", true)}], tl.now);
    drawChart("chart-depth", [{name: "depth", points: joined(tl, "depth", false)}], tl.now);
    drawChart("chart-calls", [{name: "calls/s", points: joined(tl, "calls", true)}], tl.now);
    drawChart("chart-latency", [
      {name: "p50", points: minutely(tl, tl.minutes.latency_p50_ms)},
      {name: "p99", points: minutely(tl, tl.minutes.latency_p99_ms)}], tl.now);
    var reasons = tl.minutes.failures_by_reason;
    drawChart("chart-failures", Object.keys(reasons).map(function (r) {
      return {name: r, points: minutely(tl, reasons[r])};
    }), tl.now);
  }

  // -- figures: the server renders them (one formatter, worker/serve/page.py); each refresh
  // fetches the page again and swaps these parts in, parsed inert (DOMParser runs no script)
  var PARTS = ["health", "pause", "states", "figures", "failures", "apps"];

  function swapParts(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    PARTS.forEach(function (id) {
      var now = $(id), next = fresh.getElementById(id);
      if (now && next) now.replaceWith(document.importNode(next, true));
    });
  }

  function getPage() {
    return fetch("/", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
      if (r.status !== 200) throw new Error("HTTP " + r.status);
      return r.text();
    });
  }

  function refresh() {
    return Promise.all([getPage(), getJSON("/v1/timeline")]).then(function (r) {
      if (r[1].status !== 200) throw new Error("HTTP " + r[1].status);
      swapParts(r[0]);
      drawCharts(r[1].body);
      window.tpnsRefreshes += 1;
      var u = $("updated");
      u.textContent = "updated " + new Date().toLocaleTimeString();
      u.className = "muted";
    }).catch(function (err) {
      var u = $("updated");
      u.textContent = "not updated: " + err.message;
      u.className = "bad";
    });
  }

  // -- lookup: an id, a token or an account ---------------------------------------------------
  function statusRows(title, list) {
    var box = el("div");
    box.appendChild(el("h3", {}, title));
    if (!list.length) { box.appendChild(el("p", {}, "nothing found")); return box; }
    var table = el("table"), head = el("tr");
    ["id", "state", "op", "error", "attempts", "updated"].forEach(function (h) {
      head.appendChild(el("th", {}, h));
    });
    table.appendChild(head);
    list.forEach(function (s) {
      var tr = el("tr");
      [s.id, s.state, s.operator_type, s.error || "", s.attempts, s.updated_at].forEach(
        function (v) { tr.appendChild(el("td", {}, v)); });
      table.appendChild(tr);
    });
    box.appendChild(table);
    return box;
  }

  function lookup(text) {
    var kind = ($("lookup-type") || {}).value || "0";
    var out = $("lookup-results"), q = encodeURIComponent(text);
    out.replaceChildren(el("p", {"class": "muted"}, "looking up " + text + " …"));
    var asId = /^[A-Za-z0-9._~:-]{1,64}$/.test(text) ?
      getJSON("/v1/intents/" + q) : Promise.resolve({status: 404});
    // the latest 20 by key: a glance; the CLI and the API give up to 500
    return Promise.all([asId, getJSON("/v1/intents?limit=20&token=" + q),
                        getJSON("/v1/intents?limit=20&account=" + q + "&account_type=" +
                                encodeURIComponent(kind))]).then(function (r) {
      out.replaceChildren();
      out.appendChild(statusRows("as an intent id", r[0].status === 200 ? [r[0].body] : []));
      out.appendChild(statusRows("as a token", r[1].status === 200 ? r[1].body.intents : []));
      out.appendChild(statusRows("as an account (type " + kind + ")",
                                 r[2].status === 200 ? r[2].body.intents : []));
    }).catch(function (err) { out.replaceChildren(el("p", {"class": "bad"}, err.message)); });
  }

  // -- failures as they happen: the events stream (SSE; EventSource sends the session cookie)
  function follow() {
    var list = $("live-failures");
    if (!list || !window.EventSource) return;
    var source = new EventSource("/v1/events?from=%24&state=failed");
    source.onopen = function () { setText("live-status", "(live)"); };
    source.onerror = function () { setText("live-status", "(reconnecting)"); };
    source.onmessage = function (m) {
      var e = JSON.parse(m.data);
      var text = e.at + " " + e.id + " op " + e.operator_type + ": " + (e.error || "failed") +
        (e.result_code ? ", result " + e.result_code : "") +
        (e.ret_code !== null ? ", ret_code " + e.ret_code : "");
      list.insertBefore(el("li", {}, text), list.firstChild);
      while (list.children.length > 20) list.removeChild(list.lastChild);
    };
    source.addEventListener("gap", function (m) {
      var g = JSON.parse(m.data);
      list.insertBefore(el("li", {"class": "bad"}, "gap: events trimmed before they were read" +
                                                  " (next kept: " + g.first_id + ")"),
                        list.firstChild);
    });
  }

  function start() {
    var form = $("lookup-form");
    if (!form) return;  // the sign-in form: nothing to refresh
    var old = $("lookup");
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (old) { old.remove(); old = null; }
      var text = $("lookup-input").value.trim();
      if (text) lookup(text);
    });
    $("requeue").addEventListener("click", function () {
      post("/v1/requeue-failed", {}).then(function (r) {
        setText("requeue-result", r.status === 200 ? "requeued " + r.body.requeued :
                                  "refused: " + r.body.error);
        refresh();
      });
    });
    var signout = $("signout");
    if (signout) signout.addEventListener("click", function () {
      post("/signout", {}).then(function () { window.location.assign("/"); });
    });
    refresh();
    window.setInterval(refresh, refreshMs);
    follow();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
