// The console's own behaviour, loaded as a file (the Content-Security-Policy allows no inline script).
"use strict";

document.addEventListener("click", function (event) {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  const state = document.getElementById("copy-state");
  const text = source ? source.textContent.trim() : "";
  const done = function (ok) {
    if (state) state.textContent = ok ? "Copied." : "Copy failed: select the key and copy it by hand.";
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(false); });
  } else {  // plain http on another host: select the text so that Ctrl+C copies it
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    done(document.execCommand && document.execCommand("copy"));
  }
});

document.addEventListener("submit", function (event) {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) event.preventDefault();
});

// The overview's charts (uPlot): one line per app, from the JSON the page names; redrawn every 30 s.
const PALETTE = ["#0b5cad", "#a4161a", "#1a6b2f", "#7b3fa0", "#b35c00", "#00738a", "#5a5a5a", "#c2185b"];
const plots = {};

function drawCharts(holder) {
  fetch(holder.dataset.traffic, {credentials: "same-origin", headers: {"Accept": "application/json"}})
    .then(function (response) { return response.ok ? response.json() : null; })
    .then(function (traffic) {
      if (!traffic) return;
      const apps = Object.keys(traffic.apps);
      holder.querySelectorAll("[data-chart]").forEach(function (box) {
        const kind = box.dataset.chart;
        if (!apps.length) {
          box.textContent = "No requests in the last hour.";
          return;
        }
        const data = [traffic.t].concat(apps.map(function (app) { return traffic.apps[app][kind]; }));
        const key = kind + ":" + apps.join(",");
        if (plots[kind] && plots[kind].key === key) {
          plots[kind].plot.setData(data);
          return;
        }
        if (plots[kind]) plots[kind].plot.destroy();
        box.textContent = "";
        const series = [{}].concat(apps.map(function (app, i) {
          const line = {label: app, stroke: PALETTE[i % PALETTE.length], width: 2};
          if (kind === "p95") line.points = {show: true, size: 5};  // minutes without requests are gaps
          return line;
        }));
        const plot = new uPlot({width: Math.max(box.clientWidth, 300), height: 180, series: series,
                                scales: {x: {time: true}}}, data, box);
        plots[kind] = {key: key, plot: plot};
      });
    })
    .catch(function () { /* the next round tries again */ });
}

document.addEventListener("DOMContentLoaded", function () {
  const holder = document.querySelector("[data-traffic]");
  if (!holder || typeof uPlot === "undefined") return;
  drawCharts(holder);
  setInterval(function () { drawCharts(holder); }, 30000);
});
