// A small, safe Markdown renderer for model output: the text is HTML-escaped first, then a few constructs become
// markup (fenced code, inline code, headings, lists, quotes, rules, bold, italic, strikethrough, http(s) links).
// Nothing the model writes can become a tag or an attribute of its own.
(function () {
  "use strict";

  function escapeHtml(text) {
    return text
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // `escaped` is one line, already escaped.
  function inline(escaped) {
    const codes = [];
    let s = escaped.replace(/`([^`]+)`/g, function (_, code) {
      codes.push(code);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s()]+)\)/g, function (_, label, url) {
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
    });
    s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([^_]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^*])\*(?=\S)([^*]*?\S)\*(?!\*)/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~(?=\S)([^~]*?\S)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, function (_, i) {
      return "<code>" + codes[Number(i)] + "</code>";
    });
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s{0,3}&gt;\s?(.*)$/;

  function blocks(lines) {
    const out = [];
    let para = [];
    const flush = function () {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    let i = 0;
    let m;
    while (i < lines.length) {
      const line = lines[i];
      if ((m = line.match(FENCE))) {
        flush();
        const body = [];
        i++;
        while (i < lines.length && lines[i].trim() !== m[1]) body.push(lines[i++]);
        i++; // the closing fence; while a reply streams it may not have come yet
        const lang = m[2] ? ' class="language-' + m[2] + '"' : "";
        out.push("<pre><code" + lang + ">" + body.join("\n") + "</code></pre>");
      } else if ((m = line.match(HEADING))) {
        flush();
        const n = m[1].length;
        out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">");
        i++;
      } else if (RULE.test(line)) {
        flush();
        out.push("<hr>");
        i++;
      } else if ((m = line.match(ITEM))) {
        flush();
        const ordered = /\d/.test(m[1]);
        const items = [];
        while (i < lines.length && (m = lines[i].match(ITEM)) && /\d/.test(m[1]) === ordered) {
          items.push("<li>" + inline(m[2]) + "</li>");
          i++;
        }
        const tag = ordered ? "ol" : "ul";
        out.push("<" + tag + ">" + items.join("") + "</" + tag + ">");
      } else if (QUOTE.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && (m = lines[i].match(QUOTE))) {
          quoted.push(m[1]);
          i++;
        }
        out.push("<blockquote>" + blocks(quoted) + "</blockquote>");
      } else if (!line.trim()) {
        flush();
        i++;
      } else {
        para.push(line);
        i++;
      }
    }
    flush();
    return out.join("");
  }

  function render(text) {
    const clean = String(text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
    return blocks(escapeHtml(clean).split("\n"));
  }

  window.lmfleetMarkdown = { render: render, escapeHtml: escapeHtml };
})();
