// Fills the page's parts from the server's snapshot, then follows /events/<part>
// (server-sent events): each update swaps the HTML in and redraws the plots in place.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var part = main.getAttribute("data-part");
  var live = document.getElementById("live");
  var config = {responsive: true, displayModeBar: false, topojsonURL: "/static/topojson/"};
  var updates = 0;

  function apply(p) {
    var html = p.html || {}, plots = p.plots || {};
    Object.keys(html).forEach(function (id) {
      var el = document.getElementById(id);
      if (el && el.innerHTML !== html[id]) { el.innerHTML = html[id]; }
    });
    if (window.Plotly) {
      Object.keys(plots).forEach(function (id) {
        var el = document.getElementById(id);
        if (el) { window.Plotly.react(el, plots[id].data, plots[id].layout, config); }
      });
    }
    document.dispatchEvent(new CustomEvent("dashboard:update"));
  }

  apply(JSON.parse(document.getElementById("initial").textContent));
  if (!window.EventSource) { live.textContent = "no live updates in this browser"; return; }
  var source = new EventSource("/events/" + encodeURIComponent(part));
  source.addEventListener("open", function () { live.textContent = "live"; });
  source.addEventListener("update", function (e) {
    apply(JSON.parse(e.data));
    updates += 1;
    document.body.setAttribute("data-updates", String(updates));
    live.textContent = "live · updated " + new Date().toLocaleTimeString();
  });
  source.addEventListener("error", function () { live.textContent = "reconnecting…"; });
})();
