// The widget manager typesets widget labels through MathJax 2's MathJax.Hub.Queue; the book
// loads MathJax 3, which has no Hub. Route those calls to MathJax 3's typesetPromise.
(function () {
  var mj = window.MathJax;
  if (mj && !mj.Hub) {
    mj.Hub = {
      Queue: function (job) {
        var element = job && job[2];
        if (element && mj.typesetPromise) {
          mj.typesetPromise([element]).catch(function () {});
        }
      },
    };
  }
})();
