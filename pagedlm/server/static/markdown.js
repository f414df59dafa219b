// A small markdown renderer for model output. It escapes all HTML first and only then adds
// the few tags it knows (fenced and inline code, headings, lists, quotes, bold, italic, links
// with http(s) targets), so nothing a model writes can inject markup or script.
"use strict";

(function () {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Inline spans of one escaped line: code first (its content is left alone), then emphasis.
  function inline(text) {
    const parts = text.split(/(`[^`]+`)/g);
    return parts.map((p, i) => {
      if (i % 2 === 1) return "<code>" + p.slice(1, -1) + "</code>";
      return p
        .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
        .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
          '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    }).join("");
  }

  function render(src) {
    const lines = escapeHtml(src).split("\n");
    const out = [];
    let para = [];
    let list = null; // "ul" | "ol"
    const flushPara = () => { if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; } };
    const closeList = () => { if (list) { out.push("</" + list + ">"); list = null; } };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)/);
      if (fence) {
        flushPara(); closeList();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```/.test(lines[i])) code.push(lines[i++]);
        // An unclosed fence (still streaming) renders what has arrived.
        const lang = fence[1] ? '<span class="lang">' + fence[1] + "</span>" : "";
        out.push('<pre class="code">' + lang + "<code>" + code.join("\n") + "</code></pre>");
        continue;
      }
      const h = line.match(/^(#{1,4})\s+(.*)$/);
      const li = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (h) {
        flushPara(); closeList();
        out.push("<h" + (h[1].length + 2) + ">" + inline(h[2]) + "</h" + (h[1].length + 2) + ">");
      } else if (li) {
        flushPara();
        const kind = /\d/.test(li[1]) ? "ol" : "ul";
        if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline(li[2]) + "</li>");
      } else if (/^&gt;\s?/.test(line)) {
        flushPara(); closeList();
        out.push("<blockquote>" + inline(line.replace(/^&gt;\s?/, "")) + "</blockquote>");
      } else if (line.trim() === "") {
        flushPara(); closeList();
      } else {
        closeList();
        para.push(line);
      }
    }
    flushPara(); closeList();
    return out.join("");
  }

  window.renderMarkdown = render;
  window.escapeHtml = escapeHtml;
})();
