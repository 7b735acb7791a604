// Small line charts on <canvas> for the live view: a fixed-length series per line, drawn
// scaled to the largest value shown (or a fixed maximum such as 100 for percentages).
"use strict";

window.KodkodCharts = (() => {
  class Series {
    constructor(capacity) {
      this.capacity = capacity;
      this.values = [];
    }

    push(value) {
      this.values.push(Number.isFinite(value) ? value : 0);
      if (this.values.length > this.capacity) this.values.shift();
    }

    last() {
      return this.values.length ? this.values[this.values.length - 1] : null;
    }
  }

  function cssColor(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  // lines: [{series, color}] ; options: {max (fixed top), unit (label suffix)}
  function draw(canvas, lines, options = {}) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    let top = options.max || 0;
    if (!top) {
      for (const line of lines) for (const v of line.series.values) top = Math.max(top, v);
      top = top > 0 ? top * 1.15 : 1;
    }
    const pad = 2;
    const grid = cssColor("--grid", "#334");
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const f of [0.25, 0.5, 0.75]) {
      const y = Math.round(pad + (height - 2 * pad) * f) + 0.5;
      ctx.moveTo(0, y);
      ctx.lineTo(width, y);
    }
    ctx.stroke();

    for (const line of lines) {
      const values = line.series.values;
      const capacity = line.series.capacity;
      if (!values.length) continue;
      const step = width / Math.max(capacity - 1, 1);
      const x0 = width - (values.length - 1) * step;
      const yOf = (v) => height - pad - (height - 2 * pad) * Math.min(v / top, 1);
      ctx.beginPath();
      values.forEach((v, i) => {
        const x = x0 + i * step;
        if (i === 0) ctx.moveTo(x, yOf(v));
        else ctx.lineTo(x, yOf(v));
      });
      ctx.strokeStyle = line.color;
      ctx.lineWidth = 1.5;
      ctx.stroke();
      if (line.fill) {
        ctx.lineTo(width, height);
        ctx.lineTo(x0, height);
        ctx.closePath();
        ctx.globalAlpha = 0.18;
        ctx.fillStyle = line.color;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
    }
    ctx.fillStyle = cssColor("--muted", "#889");
    ctx.font = "10px sans-serif";
    ctx.textBaseline = "top";
    const label = options.max ? `${options.max}${options.unit || ""}` : `${top.toFixed(top < 10 ? 1 : 0)}${options.unit || ""}`;
    ctx.fillText(label, 4, 3);
  }

  return { Series, draw, cssColor };
})();
