// Live job status without a framework: poll the JSON twin, update progress in place, and
// reload the page once a job's status changes (results are rendered by the server).
function watchJobs(url, ids) {
  // start from the statuses the page was rendered with: a job that finished before the first
  // poll still counts as changed
  const known = {}, hadResult = {};
  for (const el of document.querySelectorAll("[data-job][data-status]")) {
    known[el.dataset.job] = el.dataset.status;
    hadResult[el.dataset.job] = el.dataset.hasResult === "1";
  }
  async function poll() {
    let data;
    try { data = await (await fetch(url, {headers: {accept: "application/json"}})).json(); }
    catch (e) { setTimeout(poll, 2000); return; }
    const list = data.jobs || [data];
    let active = false, changed = false;
    for (const job of list) {
      if (ids && !ids.includes(job.id)) continue;
      const row = document.querySelector(`[data-job="${job.id}"]`);
      if (row) {
        const bar = row.querySelector("progress"), msg = row.querySelector(".job-message");
        const percent = row.querySelector(".job-percent");
        if (bar) bar.value = job.progress;
        if (percent) percent.textContent = `${Math.round(100 * job.progress)}%`;
        if (msg) msg.textContent = job.message;
      }
      if (known[job.id] !== undefined && known[job.id] !== job.status) changed = true;
      // a running job's first result (an ablation's chosen features, before its controls) is shown at once
      if (hadResult[job.id] === false && job.result) changed = true;
      known[job.id] = job.status;
      if (job.status === "queued" || job.status === "running") active = true;
    }
    if (changed) { location.reload(); return; }
    if (active) setTimeout(poll, 300);
  }
  poll();
}

// started by the page's own <script src=... data-watch="url" data-ids="1,2"> (no inline script: the CSP forbids it)
{
  const me = document.currentScript;
  if (me && me.dataset.watch) watchJobs(me.dataset.watch, me.dataset.ids ? me.dataset.ids.split(",").map(Number) : undefined);
}
