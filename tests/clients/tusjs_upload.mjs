// Uploads a file with tus-js-client under Node, unchanged.
//
// usage: node tusjs_upload.mjs create ENDPOINT FILE CHUNK  (creation, with data in the POST)
//        node tusjs_upload.mjs resume UPLOAD_URL FILE CHUNK (the Backend.AI flow: HEAD, PATCH)
//        node tusjs_upload.mjs parallel ENDPOINT FILE CHUNK N (N partial uploads, concatenated)
// CHUNK may be "Infinity", tus-js-client's default: the whole file in one PATCH.
//
// Prints "url <upload url>" once known, "offset <n>" as chunks are acknowledged, "done".
import fs from 'node:fs';
import * as tus from 'tus-js-client';

const [mode, url, path, chunk, streams] = process.argv.slice(2);
const size = fs.statSync(path).size;
const opts = {
  chunkSize: Number(chunk),
  uploadSize: size,
  retryDelays: [0, 500, 1000, 2000, 4000],
  onProgress: () => {},
  onChunkComplete: (_len, acked) => console.log(`offset ${acked}`),
  onSuccess: () => { console.log('done'); process.exit(0); },
  onError: (err) => { console.error(`error ${err}`); process.exit(1); },
  onAfterResponse: (req, res) => {
    // The client resolves Location against the endpoint the same way.
    if (res.getStatus() === 201) console.log(`url ${new URL(res.getHeader('Location'), url)}`);
  },
};
if (mode === 'parallel') {
  // tus-js-client's own splitting: N partials of size/N bytes (the last takes the rest), sent
  // at once, then the final upload naming their URLs.
  delete opts.uploadSize;
  delete opts.onChunkComplete;
  opts.endpoint = url;
  opts.parallelUploads = Number(streams);
  opts.metadata = { filename: path.split('/').pop() };
  opts.onAfterResponse = (req, res) => {
    const c = req.getHeader('Upload-Concat');
    if (res.getStatus() === 201) console.log(`created ${c} ${res.getHeader('Location')}`);
  };
} else if (mode === 'create') {
  opts.endpoint = url;
  opts.uploadDataDuringCreation = true;
  opts.metadata = { filename: path.split('/').pop() };
} else {
  opts.uploadUrl = url;
  console.log(`url ${url}`);
}
const upload = new tus.Upload(fs.createReadStream(path), opts);
upload.start();
