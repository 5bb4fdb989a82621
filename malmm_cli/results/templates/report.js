"use strict";
(function () {
  var video = document.getElementById("player");
  var chapters = Array.prototype.slice.call(document.querySelectorAll(".chapter[data-start]"));
  var starts = chapters.map(function (c) { return parseFloat(c.getAttribute("data-start")); });
  var current = -1;

  function highlight() {
    var t = video ? video.currentTime : 0, at = -1;
    for (var i = 0; i < starts.length; i++) { if (starts[i] <= t + 0.001) { at = i; } }
    if (at === current) { return; }
    if (current >= 0) { chapters[current].classList.remove("current"); chapters[current].removeAttribute("aria-current"); }
    if (at >= 0) { chapters[at].classList.add("current"); chapters[at].setAttribute("aria-current", "true"); }
    current = at;
  }

  function seek(i) {
    if (!video) { return; }
    video.currentTime = starts[i];
    highlight();
    var playing = video.play();
    if (playing && playing.catch) { playing.catch(function () {}); }
  }

  chapters.forEach(function (chapter, i) {
    chapter.addEventListener("click", function (event) {
      if (event.target.closest("a")) { return; }
      if (window.getSelection && String(window.getSelection()).length) { return; }
      seek(i);
    });
  });
  if (video) {
    ["timeupdate", "seeked", "play"].forEach(function (name) { video.addEventListener(name, highlight); });
  }
})();
