// The drift page's two charts, drawn with Chart.js from the JSON the page carries.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("drift-data").textContent);
  const labels = data.nights.map((night) => night.label);

  // One bar per night, one stacked segment per name (flavor or copy), each name its own hue.
  function stacked(canvasId, series) {
    const names = [...new Set(data.nights.flatMap((night) => Object.keys(night[series])))].sort();
    const datasets = names.map((name, i) => ({
      label: name,
      data: data.nights.map((night) => night[series][name] || 0),
      backgroundColor: `hsl(${Math.round((i * 360) / Math.max(names.length, 1))}, 62%, 55%)`,
    }));
    return new Chart(document.getElementById(canvasId), {
      type: "bar",
      data: { labels, datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { stacked: true, title: { display: true, text: "drift check (UTC)" } },
          y: { stacked: true, beginAtZero: true, title: { display: true, text: "stale flavor copies" } },
        },
        plugins: { legend: { position: "bottom" } },
      },
    });
  }

  if (document.getElementById("by-flavor")) {  // absent until a check has recorded a summary
    stacked("by-flavor", "by_flavor");
    stacked("by-copy", "by_copy");
  }
})();
