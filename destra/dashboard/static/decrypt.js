// The task page's "Decrypt and download", entirely in this browser tab: it reads the
// submitter's keystore file (FileReader) and passphrase, opens the keystore (scrypt from
// the vendored scrypt-js, then AES-256-GCM: destra/keystore.py), fetches the task's sealed
// result copies (/api/task/<id>/sealed: ciphertext only), opens one with the keystore's
// current or retired X25519 keys (X25519, HKDF-SHA256, AES-256-GCM: destra/crypto.py
// seal_to and destra/confidential.py open_result), checks its SHA-256 against the verified
// digest (as Client.result does) and offers the bytes as a download. The keystore, the
// passphrase, the keys and the plaintext never leave the tab.
(function (root) {
  "use strict";
  var subtle = root.crypto && root.crypto.subtle;
  var utf8 = new TextEncoder();
  // PKCS#8 prefixes of a raw 32-byte X25519 / Ed25519 private key (RFC 8410).
  var X25519_PKCS8 = fromHex("302e020100300506032b656e04220420");
  var ED25519_PKCS8 = fromHex("302e020100300506032b657004220420");
  var SEALED_VERSION = 1, NONCE = 12, TAG = 16, KEY = 32;
  var MAX_SCRYPT_MEMORY = 128 * 1024 * 1024;  // keystore.py's _MAX_SCRYPT_MEMORY

  function DecryptError(message) {
    this.name = "DecryptError";
    this.message = message;
  }
  DecryptError.prototype = Object.create(Error.prototype);

  function fromHex(text) {
    if (typeof text !== "string" || text.length % 2 || /[^0-9a-fA-F]/.test(text)) {
      throw new DecryptError("not hexadecimal");
    }
    var out = new Uint8Array(text.length / 2);
    for (var i = 0; i < out.length; i++) { out[i] = parseInt(text.substr(2 * i, 2), 16); }
    return out;
  }

  function toHex(bytes) {
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  function fromBase64(text, url) {
    if (url) { text = text.replace(/-/g, "+").replace(/_/g, "/"); }
    while (text.length % 4) { text += "="; }
    var raw = root.atob(text), out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { out[i] = raw.charCodeAt(i); }
    return out;
  }

  function concat() {
    var parts = Array.prototype.slice.call(arguments), size = 0, at = 0;
    parts.forEach(function (p) { size += p.length; });
    var out = new Uint8Array(size);
    parts.forEach(function (p) { out.set(p, at); at += p.length; });
    return out;
  }

  function equal(a, b) {
    if (a.length !== b.length) { return false; }
    var diff = 0;
    for (var i = 0; i < a.length; i++) { diff |= a[i] ^ b[i]; }
    return diff === 0;
  }

  // crypto.associated_data: "destra/<purpose>\0part\0part..." in UTF-8.
  function associated(purpose, parts) {
    return utf8.encode(["destra/" + purpose].concat(parts.map(String)).join("\0"));
  }

  // crypto.open_sealed: version (1) | nonce (12) | ciphertext | tag (16); null when the
  // key, the associated data or the bytes are wrong (the tag does not verify).
  async function openSealed(key, sealed, ad) {
    if (sealed.length < 1 + NONCE + TAG || sealed[0] !== SEALED_VERSION) {
      throw new DecryptError("not a sealed Destra ciphertext (bad length or version)");
    }
    var aes = await subtle.importKey("raw", key, {name: "AES-GCM"}, false, ["decrypt"]);
    try {
      return new Uint8Array(await subtle.decrypt(
        {name: "AES-GCM", iv: sealed.subarray(1, 1 + NONCE), additionalData: ad, tagLength: 128},
        aes, sealed.subarray(1 + NONCE)));
    } catch (e) {
      return null;
    }
  }

  async function x25519Pair(secret) {
    if (secret.length !== KEY) { throw new DecryptError("an X25519 secret is 32 bytes"); }
    var key = await subtle.importKey("pkcs8", concat(X25519_PKCS8, secret), {name: "X25519"},
                                     true, ["deriveBits"]);
    var jwk = await subtle.exportKey("jwk", key);
    return {secret: key, public: fromBase64(jwk.x, true)};
  }

  async function ed25519Public(seed) {
    if (seed.length !== KEY) { throw new DecryptError("an Ed25519 seed is 32 bytes"); }
    var key = await subtle.importKey("pkcs8", concat(ED25519_PKCS8, seed), {name: "Ed25519"},
                                     true, ["sign"]);
    return fromBase64((await subtle.exportKey("jwk", key)).x, true);
  }

  // keystore.load: every key pair of a version-1 keystore, current first, checked against
  // its public header (a swapped header is refused, as keystore._decrypt does).
  async function openKeystore(text, passphrase, progress) {
    var data, kdf;
    try {
      data = JSON.parse(text);
    } catch (e) {
      throw new DecryptError("this file is not a Destra keystore (not JSON)");
    }
    if (!data || typeof data !== "object" || data.format !== "destra-keystore") {
      throw new DecryptError("this file is not a Destra keystore (no \"format\": " +
                             "\"destra-keystore\"; a legacy plaintext key file must be " +
                             "loaded once by the destra CLI to be encrypted)");
    }
    if (data.version !== 1) {
      throw new DecryptError("unsupported keystore version " + JSON.stringify(data.version));
    }
    kdf = data.kdf || {};
    if (kdf.name !== "scrypt" || data.cipher !== "aes-256-gcm") {
      throw new DecryptError("unsupported keystore kdf or cipher");
    }
    var n = kdf.n, r = kdf.r, p = kdf.p;
    if (![n, r, p].every(Number.isSafeInteger) || n < 2 || (n & (n - 1)) || r < 1 ||
        p < 1 || p > 16 || 128 * n * r > MAX_SCRYPT_MEMORY) {
      throw new DecryptError("unsupported scrypt parameters n=" + n + " r=" + r + " p=" + p);
    }
    if (!passphrase) { throw new DecryptError("type the keystore's passphrase"); }
    var salt, sealed;
    try {
      salt = fromHex(kdf.salt);
      sealed = fromHex(data.sealed);
    } catch (e) {
      throw new DecryptError("malformed keystore (salt or sealed is not hexadecimal)");
    }
    var key = await root.scrypt.scrypt(utf8.encode(passphrase), salt, n, r, p, KEY, progress);
    var corrupted = new DecryptError("wrong passphrase (or a corrupted keystore): the " +
                                     "keystore did not open");
    var plain = await openSealed(key, sealed, associated("keystore",
                                                         [String((data.public || {}).signing)]));
    key.fill(0);
    if (plain === null) { throw corrupted; }
    var pairs = [], headers = [data.public].concat(data.previous_public || []);
    try {
      var secrets = JSON.parse(new TextDecoder().decode(plain));
      plain.fill(0);
      var all = [secrets.current].concat(secrets.previous);
      if (all.length !== headers.length) { throw corrupted; }
      for (var i = 0; i < all.length; i++) {
        var pair = await x25519Pair(fromHex(all[i].secret));
        var signing = await ed25519Public(fromHex(all[i].seed));
        if (toHex(pair.public) !== String(headers[i].encryption).toLowerCase() ||
            toHex(signing) !== String(headers[i].signing).toLowerCase()) {
          throw corrupted;
        }
        pairs.push(pair);
      }
    } catch (e) {
      if (e === corrupted) { throw e; }
      throw new DecryptError("corrupted keystore: its secrets do not match its public " +
                             "keys (" + (e.message || e) + ")");
    }
    return pairs;
  }

  // crypto.open_sealed_to: ephemeral public (32) | seal(KEK, ...), the KEK from HKDF-SHA256
  // over the X25519 shared secret, info "destra/sealed-box/v1" | ephemeral | recipient.
  async function openSealedTo(pair, sealed, ad) {
    if (sealed.length < KEY) { throw new DecryptError("sealed message too short"); }
    var ephemeral = sealed.subarray(0, KEY);
    var peer = await subtle.importKey("raw", ephemeral, {name: "X25519"}, false, []);
    var shared;
    try {
      shared = await subtle.deriveBits({name: "X25519", public: peer}, pair.secret, 256);
    } catch (e) {  // an all-zero shared secret: a low-order point was sent
      return null;
    }
    var ikm = await subtle.importKey("raw", shared, "HKDF", false, ["deriveBits"]);
    var kek = new Uint8Array(await subtle.deriveBits({
      name: "HKDF", hash: "SHA-256", salt: new Uint8Array(32),  // RFC 5869's default salt
      info: concat(utf8.encode("destra/sealed-box/v1"), ephemeral, pair.public)}, ikm, 256));
    return openSealed(kek, sealed.subarray(KEY), ad);
  }

  // Client.result: the first agreeing node's copy that opens with one of the keys and
  // whose SHA-256 is the verified digest; a DecryptError naming each copy's problem else.
  async function openResult(pairs, body) {
    var problems = (body.problems || []).slice();
    for (var i = 0; i < body.copies.length; i++) {
      var copy = body.copies[i], sealed = fromBase64(copy.sealed, false), output = null;
      var ad = associated("result", [body.task_id, copy.node_id, copy.attempt]);
      for (var k = 0; k < pairs.length && output === null; k++) {
        output = await openSealedTo(pairs[k], sealed, ad);
      }
      if (output === null) {
        problems.push(copy.node_id + ": no key of this keystore opens it (sealed to " +
                      "another account's key?)");
        continue;
      }
      var digest = toHex(new Uint8Array(await subtle.digest("SHA-256", output)));
      if (digest !== body.digest) {
        problems.push(copy.node_id + ": its SHA-256 " + digest.slice(0, 16) +
                      "... is not the verified digest " + body.digest.slice(0, 16) + "...");
        continue;
      }
      return {output: output, node_id: copy.node_id, digest: digest};
    }
    throw new DecryptError("no copy of the result opens to the verified digest " +
                           String(body.digest).slice(0, 16) + "...: " +
                           (problems.join("; ") || "no agreeing node's copy is available"));
  }

  // The download's name: <task>.safetensors for a user program's output tensors (an
  // 8-byte little-endian header length, then the JSON header), <task>.json when the
  // output is JSON text, <task>.out otherwise.
  function fileFor(taskId, output) {
    if (output.length > 9 && output[8] === 0x7b) {
      var header = 0;
      for (var i = 7; i >= 0; i--) { header = header * 256 + output[i]; }
      if (header > 1 && 8 + header <= output.length) {
        return {name: taskId + ".safetensors", type: "application/octet-stream"};
      }
    }
    try {
      JSON.parse(new TextDecoder("utf-8", {fatal: true}).decode(output));
      return {name: taskId + ".json", type: "application/json"};
    } catch (e) {
      return {name: taskId + ".out", type: "application/octet-stream"};
    }
  }

  root.DestraDecrypt = {openKeystore: openKeystore, openResult: openResult,
                        fileFor: fileFor, DecryptError: DecryptError};

  // -- the page ---------------------------------------------------------------------------

  var doc = root.document;
  var section = doc && doc.getElementById("task-decrypt");
  if (!section) { return; }
  var form = doc.getElementById("decrypt-form");
  var fileInput = doc.getElementById("decrypt-keystore");
  var passInput = doc.getElementById("decrypt-passphrase");
  var button = doc.getElementById("decrypt-button");
  var status = doc.getElementById("decrypt-status");
  var saved = doc.getElementById("decrypt-saved");
  var taskId = section.getAttribute("data-task");
  var url = null;

  function say(text, kind) {
    status.textContent = text;
    status.className = kind || "";
  }

  // Shown once the task is verified (its result command is on the page).
  function show() { section.hidden = !doc.getElementById("result-command"); }
  show();
  doc.addEventListener("dashboard:update", show);

  if (!subtle || !root.scrypt || !root.FileReader) {
    say("This browser lacks WebCrypto or FileReader: use the destra result command.", "error");
    button.disabled = true;
    return;
  }

  function readFile(file) {
    return new Promise(function (resolve, reject) {
      var reader = new root.FileReader();
      reader.onload = function () { resolve(reader.result); };
      reader.onerror = function () { reject(new DecryptError("cannot read the file")); };
      reader.readAsText(file);
    });
  }

  async function sealedCopies() {
    var response = await root.fetch("/api/task/" + encodeURIComponent(taskId) + "/sealed",
                                    {cache: "no-store"});
    var body;
    try {
      body = await response.json();
    } catch (e) {
      throw new DecryptError("the server answered " + response.status + " without JSON");
    }
    if (!response.ok) { throw new DecryptError(body.error || ("HTTP " + response.status)); }
    return body;
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    var file = fileInput.files && fileInput.files[0];
    if (!file || !passInput.value) {
      say("Choose your keystore file and type its passphrase.", "error");
      return;
    }
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      say("Reading the keystore…");
      var text = await readFile(file);
      var shown = -1;
      var passphrase = passInput.value;
      passInput.value = "";  // tried once, not kept in the page
      var pairs = await openKeystore(text, passphrase, function (done) {
        var pct = Math.floor(done * 10) * 10;
        if (pct !== shown) { shown = pct; say("Deriving the key from the passphrase " +
                                              "(scrypt)… " + pct + " %"); }
      });
      passphrase = null;
      say("Keystore open (" + pairs.length + " key" + (pairs.length > 1 ? "s" : "") +
          "). Fetching the sealed result…");
      var body = await sealedCopies();
      say("Decrypting and checking against the verified digest…");
      var result = await openResult(pairs, body);
      var kind = fileFor(taskId, result.output);
      if (url) { root.URL.revokeObjectURL(url); }
      url = root.URL.createObjectURL(new root.Blob([result.output], {type: kind.type}));
      var link = doc.createElement("a");
      link.href = url;
      link.download = kind.name;
      link.id = "decrypt-download";
      link.textContent = "Save " + kind.name + " again";
      saved.replaceChildren(link);
      link.click();
      say("Decrypted " + result.output.length.toLocaleString() + " bytes from " +
          result.node_id + "; SHA-256 " + result.digest.slice(0, 16) + "... is the verified " +
          "digest. Downloaded as " + kind.name + ".", "ok");
    } catch (e) {
      say(e instanceof DecryptError ? capital(e.message) + "."
        : "Decryption failed: " + (e && e.message ? e.message : String(e)), "error");
      if (!passInput.value) { passInput.focus(); }
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });

  function capital(text) { return text.charAt(0).toUpperCase() + text.slice(1); }
})(typeof window !== "undefined" ? window : globalThis);
