//! Certificates for TLS tests: a private CA and certificates it signed, made with openssl.

use std::path::Path;
use std::process::Command;

use super::WAIT;
use super::process::RunWithin as _;

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output_within(WAIT)
        .expect("openssl runs");
    assert!(
        st.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in `dir`.
pub fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=storagetier test CA",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext file");
    for who in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
            ],
        );
    }
    for f in ["ca.pem", "server.pem", "server.key"] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644));
    }
}

/// An HTTPS server answering every POST with 200 (its body read, nothing kept), on a
/// certificate of `dir` (see [`make_certificates`]): an HTTP peer behind a private CA.
/// A Python process that dies with the test.
pub struct HttpsPeer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    _process: super::process::Guarded,
}

const HTTPS_PEER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl HttpsPeer {
    /// Starts one on `dir`'s `server.pem` and `server.key`.
    pub fn start(dir: &Path) -> HttpsPeer {
        use std::io::BufRead as _;
        let mut process = super::process::spawn(
            Command::new("python3")
                .arg("-c")
                .arg(HTTPS_PEER)
                .arg(dir.join("server.pem"))
                .arg(dir.join("server.key"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null()),
        )
        .expect("python3 runs");
        let out = process.take_stdout().expect("its stdout");
        let mut lines = std::io::BufReader::new(out);
        let mut first = String::new();
        lines
            .read_line(&mut first)
            .expect("the peer reports its port");
        let port = first.trim().parse().expect("a port");
        HttpsPeer {
            port,
            _process: process,
        }
    }
}
