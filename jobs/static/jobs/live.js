/* Live regions: every element with data-live-url has its content replaced by
 * a fetch of that URL every data-live-interval ms (2 s), while the tab is
 * visible. Observable for tests: data-live-state (idle|polling|paused|error),
 * data-live-refreshes (count) and data-live-updated (ISO time) on the region,
 * and a "live:updated" event on it after each swap. */
(function () {
  "use strict";
  var regions = Array.prototype.slice.call(document.querySelectorAll("[data-live-url]"));
  if (!regions.length) return;
  var timers = new Map();

  function keepState(region) {
    // What a swap must not undo: ticked boxes, open <details>, scrolled tables.
    var checked = Array.prototype.map.call(region.querySelectorAll("input[type=checkbox][name]:checked"),
      function (box) { return box.name + "=" + box.value; });
    var open = Array.prototype.map.call(region.querySelectorAll("details[id][open]"), function (d) { return d.id; });
    var scrolls = Array.prototype.map.call(region.querySelectorAll(".table-scroll"), function (s) { return s.scrollLeft; });
    return function restore() {
      region.querySelectorAll("input[type=checkbox][name]").forEach(function (box) {
        if (checked.indexOf(box.name + "=" + box.value) !== -1) box.checked = true;
      });
      open.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
      region.querySelectorAll(".table-scroll").forEach(function (s, i) { if (scrolls[i]) s.scrollLeft = scrolls[i]; });
    };
  }

  function refresh(region) {
    if (region.dataset.liveBusy === "1") return;
    region.dataset.liveBusy = "1";
    fetch(region.dataset.liveUrl, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" }, cache: "no-store" })
      .then(function (response) {
        if (response.redirected || response.status === 401 || response.status === 403) {
          window.location.reload(); // signed out: let the page go to the login form
          return null;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (html === null) return;
        var restore = keepState(region);
        region.innerHTML = html;
        restore();
        region.dataset.liveRefreshes = String(Number(region.dataset.liveRefreshes || 0) + 1);
        region.dataset.liveUpdated = new Date().toISOString();
        if (!document.hidden) setState(region, "polling");
        region.dispatchEvent(new CustomEvent("live:updated", { bubbles: true }));
      })
      .catch(function () { setState(region, "error"); })
      .then(function () { region.dataset.liveBusy = "0"; });
  }

  function setState(region, state) {
    region.dataset.liveState = state;
    document.querySelectorAll("[data-live-indicator]").forEach(function (el) {
      el.textContent = state === "polling" ? "live" : state;
      el.dataset.state = state;
    });
  }

  function start(region) {
    if (timers.has(region)) return;
    var every = Number(region.dataset.liveInterval) || 2000;
    timers.set(region, window.setInterval(function () { refresh(region); }, every));
    setState(region, "polling");
  }

  function stop(region) {
    window.clearInterval(timers.get(region));
    timers.delete(region);
    setState(region, "paused");
  }

  document.addEventListener("visibilitychange", function () {
    regions.forEach(function (region) {
      if (document.hidden) { stop(region); } else { refresh(region); start(region); }
    });
  });

  // "Select all" for the job list; the box lives inside the region, so delegate.
  document.addEventListener("change", function (event) {
    var all = event.target.closest && event.target.closest("[data-select-all]");
    if (!all) return;
    var table = all.closest("table");
    table.querySelectorAll("input[type=checkbox][name=job]").forEach(function (box) { box.checked = all.checked; });
  });

  regions.forEach(function (region) { if (document.hidden) setState(region, "paused"); else start(region); });
})();
