() => {
  const marker = () => {
    let m = document.getElementById('ovd-marker');
    if (!m) { m = document.createElement('div'); m.id = 'ovd-marker'; }
    return m;
  };
  document.addEventListener('click', (e) => {
    const img = e.target instanceof Element ? e.target.closest('#overlay img') : null;
    if (!img || !img.parentElement || !img.naturalWidth) return;
    // the picture inside the <img> box: scaled down to fit (never up), centred
    const r = img.getBoundingClientRect();
    const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight, 1);
    const dx = (r.width - img.naturalWidth * s) / 2, dy = (r.height - img.naturalHeight * s) / 2;
    if (e.clientX < r.left + dx || e.clientX >= r.right - dx ||
        e.clientY < r.top + dy || e.clientY >= r.bottom - dy) return;
    const box = img.parentElement;
    if (getComputedStyle(box).position === 'static') box.style.position = 'relative';
    const m = marker();
    if (m.parentElement !== box) box.appendChild(m);
    const b = box.getBoundingClientRect();
    m.style.left = (e.clientX - b.left) + 'px';
    m.style.top = (e.clientY - b.top) + 'px';
    m.style.display = 'block';
  }, true);
  document.addEventListener('load', (e) => {
    if (e.target instanceof Element && e.target.matches('#overlay img')) {
      const m = document.getElementById('ovd-marker');
      if (m) m.style.display = 'none';
    }
  }, true);
}
