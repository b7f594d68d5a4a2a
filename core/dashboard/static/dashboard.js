// Live updates: about every second, fetch this page again and swap in the elements marked
// `data-live` (matched by id). No reload, so scroll position and focus stay; a region holding
// the focused form field is left alone until the field loses focus. An element whose fresh
// copy is no longer `data-live` (a job that ended) is swapped one last time, then left still.
// A page that takes long to render (a slow backend) is asked for less often: the next fetch
// waits at least twice as long as the last one took, so open tabs never keep a server busy.
(function () {
  "use strict";
  var INTERVAL = 1000;

  function mark(ok) {
    var badge = document.getElementById("live-state");
    if (badge) {
      badge.className = ok ? "live-state" : "live-state stale";
      badge.textContent = ok ? "live" : "not updating";
    }
  }

  function holdsFocus(element) {
    var active = document.activeElement;
    return active && active !== document.body && element.contains(active) &&
      /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function later(delay) {
    window.setTimeout(refresh, Math.max(INTERVAL, delay));
  }

  function refresh() {
    var regions = document.querySelectorAll("[data-live][id]");
    if (regions.length === 0) {
      return; // nothing on this page changes any more
    }
    if (document.hidden) {
      later(INTERVAL);
      return;
    }
    var started = Date.now();
    fetch(window.location.href, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Topiq-Live": "1" }
    }).then(function (response) {
      if (response.redirected && new URL(response.url).pathname === "/login") {
        window.location.reload();
        return null;
      }
      if (!response.ok) {
        mark(false);
        return null;
      }
      return response.text();
    }).then(function (html) {
      if (html === null || html === undefined) {
        return;
      }
      var fresh = new DOMParser().parseFromString(html, "text/html");
      regions.forEach(function (element) {
        var copy = fresh.getElementById(element.id);
        if (!copy || holdsFocus(element)) {
          return;
        }
        if (copy.innerHTML !== element.innerHTML) {
          element.innerHTML = copy.innerHTML;
        }
        if (!copy.hasAttribute("data-live")) {
          element.removeAttribute("data-live");
        }
      });
      mark(true);
    }).catch(function () {
      mark(false);
    }).then(function () {
      later(2 * (Date.now() - started));
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("connection");
    if (select && select.form) {
      select.addEventListener("change", function () { select.form.submit(); });
    }
    later(INTERVAL);
  });
})();
