// The Collections pages' little JavaScript: ages that stay current, and hits that open on a click.
(function () {
  function age(seconds) {
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }
  function refresh() {
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(when)) el.textContent = age(Math.max(0, (Date.now() - when) / 1000));
    });
  }
  document.addEventListener("click", function (event) {
    var hit = event.target.closest(".hit");
    if (hit) hit.classList.toggle("open");
  });
  refresh();
  setInterval(refresh, 15000);
})();
